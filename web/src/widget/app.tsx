/** The widget UI: floating button and chat panel (rendered inside a shadow root). */
import { useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { detectLang, storedLang, storeLang, translator, LANGS, type Lang } from '../shared/i18n';
import { ACCEPT_ATTRIBUTE, checkAttachment, formatBytes, isImage, MAX_ATTACHMENTS_PER_MESSAGE, type Attachment } from '../shared/files';
import { formatClock, formatWhen } from '../shared/format';
import { PaperclipIcon } from '../shared/icons';
import type { LinkState } from '../shared/socket';
import { WIDGET_DICTS, type WKey } from './strings';
import { lastOperatorSeq, quickReplies, withBot, type ClientEvent, type PendingSend, type WidgetState } from './widget-state';
import { SEEN_KEY, type ClosedNotice, type WidgetSession } from './widget-session';

const OPEN_KEY = 'switchboard.widget.open';

function useSession(session: WidgetSession): WidgetState {
  const [s, set] = useState(session.state);
  useEffect(() => {
    set(session.state);
    const off = session.store.subscribe(set);
    return () => void off();
  }, [session]);
  return s;
}

function useTick(ms: number) {
  const [, set] = useState(0);
  useEffect(() => {
    const h = setInterval(() => set((x) => x + 1), ms);
    return () => clearInterval(h);
  }, [ms]);
}

function ls(): Storage | null {
  try {
    return window.localStorage;
  } catch {
    return null;
  }
}

export function WidgetApp(props: { session: WidgetSession; langHint?: string; openHint?: boolean }) {
  const { session } = props;
  // Per channel, as the session is: two widgets on one site open and count apart.
  const suffix = session.channel ? `.${session.channel}` : '';
  const openKey = OPEN_KEY + suffix;
  const seenKey = SEEN_KEY + suffix;
  const [lang, setLangState] = useState<Lang>(() => detectLang(storedLang(ls() ?? undefined) ?? props.langHint, navigator.languages));
  const t = useMemo(() => translator(WIDGET_DICTS, lang), [lang]);
  const setLang = (l: Lang) => {
    storeLang(ls() ?? undefined, l);
    setLangState(l);
  };
  const state = useSession(session);
  const [open, setOpenState] = useState<boolean>(() => props.openHint || ls()?.getItem(openKey) === '1');
  const [seen, setSeen] = useState<number>(() => Number(ls()?.getItem(seenKey) ?? 0) || 0);
  const [link, setLink] = useState<LinkState | null>(session.linkState);
  const [notice, setNotice] = useState<string | null>(null);
  const [visible, setVisible] = useState(document.visibilityState === 'visible');
  const button = useRef<HTMLButtonElement>(null);

  const setOpen = (o: boolean) => {
    try {
      ls()?.setItem(openKey, o ? '1' : '0');
    } catch {
      /* ignore */
    }
    setOpenState(o);
    if (!o) setTimeout(() => button.current?.focus(), 0);
  };

  useEffect(() => {
    session.onLink = setLink;
    session.onNotice = (code: string, message?: string) => {
      const key = ('err_' + code) as WKey;
      // A block or allow list: the text the contact center chose for it.
      if (code === 'blocked' && message) return setNotice(message);
      setNotice(code === 'session_lost' ? t('session_lost') : key in WIDGET_DICTS.en ? t(key) : t('err_generic'));
    };
  }, [session, t]);

  useEffect(() => {
    session.resumeIfAny();
    const vis = () => setVisible(document.visibilityState === 'visible');
    const online = () => session.link.retryNow();
    document.addEventListener('visibilitychange', vis);
    window.addEventListener('online', online);
    return () => {
      document.removeEventListener('visibilitychange', vis);
      window.removeEventListener('online', online);
    };
  }, [session]);

  // While the panel is open and the page visible, everything shown counts as read.
  const lastOp = lastOperatorSeq(state);
  useEffect(() => {
    if (!open || !visible) return;
    if (lastOp > seen) {
      setSeen(lastOp);
      try {
        ls()?.setItem(seenKey, String(lastOp));
      } catch {
        /* ignore */
      }
    }
    session.markRead();
  }, [open, visible, lastOp, state.lastSeq]);

  useEffect(() => {
    if (!state.token && seen) {
      setSeen(0);
      try {
        ls()?.removeItem(seenKey);
      } catch {
        /* ignore */
      }
    }
  }, [state.token]);

  const unread = state.events.filter((e) => e.kind === 'message' && e.from === 'operator' && e.seq > seen).length;

  return (
    <div class={'sbw sbw-' + lang} lang={lang}>
      {open && (
        <Panel
          session={session}
          state={state}
          t={t}
          lang={lang}
          setLang={setLang}
          link={link}
          notice={notice}
          clearNotice={() => setNotice(null)}
          onMinimize={() => setOpen(false)}
        />
      )}
      <button
        ref={button}
        type="button"
        class="sbw-launcher"
        data-testid="widget-launcher"
        aria-label={open ? t('close_panel') : t('open_chat')}
        aria-expanded={open}
        onClick={() => setOpen(!open)}
      >
        <svg viewBox="0 0 24 24" width="26" height="26" aria-hidden="true">
          {open ? <path d="M6 6l12 12M18 6L6 18" stroke="currentColor" stroke-width="2.2" stroke-linecap="round" fill="none" /> : <path d="M4 5h16v11H9l-5 4z" fill="currentColor" />}
        </svg>
        {!open && unread > 0 && (
          <span class="sbw-badge" data-testid="widget-unread" aria-label={t('unread', { n: unread })}>
            {unread}
          </span>
        )}
      </button>
    </div>
  );
}

type T = (k: WKey, p?: Record<string, string | number>) => string;

function Panel(props: {
  session: WidgetSession;
  state: WidgetState;
  t: T;
  lang: Lang;
  setLang: (l: Lang) => void;
  link: LinkState | null;
  notice: string | null;
  clearNotice: () => void;
  onMinimize: () => void;
}) {
  const { session, state, t } = props;
  useTick(1000);
  const panel = useRef<HTMLDivElement>(null);
  const log = useRef<HTMLOListElement>(null);
  useEffect(() => {
    panel.current?.querySelector<HTMLElement>('textarea, button.sbw-primary')?.focus();
  }, []);
  useEffect(() => {
    const el = log.current;
    if (el) el.scrollTop = el.scrollHeight;
  }, [state.events.length, state.pending.length]);
  // An outage notice in force, and the closed notice outside working hours: shown before
  // the customer writes (re-read on opening).
  const [emergency, setEmergency] = useState<string | null>(null);
  const [closed, setClosed] = useState<ClosedNotice | null>(null);
  useEffect(() => {
    let live = true;
    session.notices().then((n) => live && (setEmergency(n.emergency), setClosed(n.closed)));
    return () => {
      live = false;
    };
  }, []);
  const typing = state.operatorTypingUntil > Date.now();
  const replies = quickReplies(state);
  // A quick reply is sent like a typed message; its buttons go, so the focus goes to the
  // message box rather than being lost.
  const reply = (text: string) => {
    session.send(text);
    panel.current?.querySelector<HTMLElement>('textarea')?.focus();
  };
  const active = !!state.token && !state.closed;
  const reconnecting = !!props.link && (props.link.status === 'reconnecting' || (props.link.status === 'connecting' && props.link.attempt > 0));
  return (
    <div
      ref={panel}
      class="sbw-panel"
      role="dialog"
      aria-label={t('title')}
      data-testid="widget-panel"
      onKeyDown={(e) => {
        if (e.key === 'Escape') props.onMinimize();
      }}
    >
      <div class="sbw-head">
        <div class="sbw-head-text">
          <strong>{t('title')}</strong>
          <span class="sbw-sub" data-testid="widget-status">
            {state.closed ? '' : state.operatorName ? t('with_operator', { name: state.operatorName }) : withBot(state) ? t('with_bot') : state.token ? t('waiting') : ''}
          </span>
        </div>
        <label class="sbw-lang">
          <span class="sbw-sr">{t('language')}</span>
          <select value={props.lang} onChange={(e) => props.setLang((e.currentTarget as HTMLSelectElement).value as Lang)}>
            {LANGS.map((l) => (
              <option key={l} value={l}>
                {l.toUpperCase()}
              </option>
            ))}
          </select>
        </label>
        <button type="button" class="sbw-icon" aria-label={t('close_panel')} onClick={props.onMinimize}>
          –
        </button>
      </div>
      {emergency && (
        <div class="sbw-banner sbw-emergency" role="alert" data-testid="widget-emergency">
          {emergency}
        </div>
      )}
      {closed && (
        <div class="sbw-banner sbw-closed" role="status" data-testid="widget-closed" data-action={closed.action}>
          {closed.message || t('closed_default')}
          {closed.opens_at != null && <span class="sbw-closed-more"> {t('closed_opens_at', { time: formatWhen(closed.opens_at, props.lang) })}</span>}
          {closed.action === 'wait' && <span class="sbw-closed-more"> {t('closed_wait')}</span>}
        </div>
      )}
      {reconnecting && (
        <div class="sbw-banner" role="status" data-testid="widget-reconnecting">
          {t('reconnecting')}
        </div>
      )}
      {props.notice && (
        <div class="sbw-notice" role="alert">
          <span>{props.notice}</span>
          <button type="button" class="sbw-icon" aria-label={t('dismiss')} onClick={props.clearNotice}>
            ×
          </button>
        </div>
      )}
      <ol ref={log} class="sbw-log" aria-live="polite" aria-label={t('title')} data-testid="widget-log" tabIndex={0}>
        {!state.token && !state.pending.length && <li class="sbw-intro">{t('intro')}</li>}
        {state.events.map((e) => (
          <EventView key={e.seq} e={e} t={t} lang={props.lang} session={session} readUpto={state.operatorReadUpto} replies={replies?.seq === e.seq ? replies.buttons : undefined} onReply={reply} />
        ))}
        {state.pending.map((p) => (
          <PendingView key={p.key} p={p} t={t} session={session} readUpto={state.operatorReadUpto} />
        ))}
      </ol>
      <p class="sbw-typing" aria-live="polite" data-testid="widget-typing">
        {typing ? t('typing', { name: state.operatorName || t('operator') }) : ''}
      </p>
      {state.closed ? (
        <Rating session={session} state={state} t={t} />
      ) : (
        <Composer session={session} state={state} t={t} />
      )}
      {active && (
        <button
          type="button"
          class="sbw-end"
          data-testid="widget-end"
          onClick={() => {
            if (confirm(t('confirm_end'))) session.close();
          }}
        >
          {t('end_chat')}
        </button>
      )}
    </div>
  );
}

function AttachmentLink(props: { a: Attachment; session: WidgetSession }) {
  const url = props.session.attachmentUrl(props.a.id);
  if (isImage(props.a.content_type)) {
    return (
      <a class="sbw-att" href={url} target="_blank" rel="noopener">
        <img src={url} alt={props.a.name} loading="lazy" />
      </a>
    );
  }
  return (
    <a class="sbw-att sbw-file" href={url} target="_blank" rel="noopener" download={props.a.name}>
      <PaperclipIcon /> {props.a.name} <span class="sbw-muted">({formatBytes(props.a.size)})</span>
    </a>
  );
}

function EventView(props: {
  e: ClientEvent;
  t: T;
  lang: Lang;
  session: WidgetSession;
  readUpto: number;
  /** The quick replies shown under this (the newest bot) message. */
  replies?: string[];
  onReply: (text: string) => void;
}) {
  const { e, t } = props;
  const time = <time dateTime={new Date(e.at).toISOString()}>{formatClock(e.at, props.lang)}</time>;
  if (e.kind === 'message') {
    const mine = e.from === 'client';
    return (
      <li class={'sbw-msg ' + (mine ? 'sbw-mine' : e.from === 'bot' ? 'sbw-theirs sbw-bot' : 'sbw-theirs')} data-testid="widget-message" data-seq={e.seq} data-from={e.from}>
        {!mine && <span class="sbw-who">{e.from === 'bot' ? t('assistant') : e.name || t('operator')}</span>}
        {e.text && (
          <span class="sbw-text" dir="auto">
            {e.text}
          </span>
        )}
        {e.attachments?.map((a) => <AttachmentLink key={a.id} a={a} session={props.session} />)}
        <span class="sbw-meta">
          {time}
          {mine && (
            <span class="sbw-tick" data-testid="widget-delivery" data-state={props.readUpto >= e.seq ? 'read' : 'sent'} title={props.readUpto >= e.seq ? t('read') : t('sent')}>
              {props.readUpto >= e.seq ? '✓✓' : '✓'}
            </span>
          )}
        </span>
        {props.replies && (
          <div class="sbw-quick" role="group" aria-label={t('quick_replies')} data-testid="widget-quick-replies">
            {props.replies.map((b) => (
              <button key={b} type="button" class="sbw-quick-btn" data-testid="widget-quick-reply" onClick={() => props.onReply(b)}>
                {b}
              </button>
            ))}
          </div>
        )}
      </li>
    );
  }
  let text = '';
  switch (e.kind) {
    case 'started':
      text = t('started');
      break;
    case 'queued':
      text = t('queued');
      break;
    case 'handoff':
      text = t('handoff');
      break;
    case 'assigned':
      text = t('assigned', { name: e.name || t('operator') });
      break;
    case 'transferred':
      text = t('transferred');
      break;
    case 'closed':
      text = e.by === 'client' ? t('closed_by_client') : e.by === 'system' ? t('closed_by_system') : t('closed_by_operator');
      break;
    case 'rated':
      text = t('rated', { score: e.score ?? 0 });
      break;
    case 'notice':
      text = e.text ?? '';
      break;
    default:
      return null;
  }
  return (
    <li class="sbw-sys" data-testid={'widget-entry-' + e.kind}>
      {text} {time}
    </li>
  );
}

function PendingView(props: { p: PendingSend; t: T; session: WidgetSession; readUpto: number }) {
  const { p, t } = props;
  const delivered = p.ackSeq != null;
  return (
    <li class={'sbw-msg sbw-mine' + (p.state === 'failed' ? ' sbw-failed' : ' sbw-pending')} data-testid="widget-message-pending">
      {p.text && (
        <span class="sbw-text" dir="auto">
          {p.text}
        </span>
      )}
      {p.attachments.map((a) => (
        <span key={a.id} class="sbw-att sbw-file">
          <PaperclipIcon /> {a.name}
        </span>
      ))}
      <span class="sbw-meta">
        {p.state === 'failed' ? (
          <>
            {t('failed')}{' '}
            <button type="button" class="sbw-link" onClick={() => props.session.retry(p.key)}>
              {t('retry')}
            </button>{' '}
            <button type="button" class="sbw-link" onClick={() => props.session.discard(p.key)}>
              {t('discard')}
            </button>
          </>
        ) : delivered ? (
          <span class="sbw-tick" data-testid="widget-delivery" data-state="sent">
            ✓
          </span>
        ) : (
          t('sending')
        )}
      </span>
    </li>
  );
}

function Composer(props: { session: WidgetSession; state: WidgetState; t: T }) {
  const { session, state, t } = props;
  const [text, setText] = useState('');
  // A returning visitor keeps the name they gave before (they may change it).
  const [name, setName] = useState(() => session.storedName());
  const [files, setFiles] = useState<Attachment[]>([]);
  const [busy, setBusy] = useState(0);
  const [problem, setProblem] = useState<string | null>(null);
  const input = useRef<HTMLTextAreaElement>(null);
  const fileInput = useRef<HTMLInputElement>(null);
  const send = () => {
    if (!text.trim() && !files.length) return;
    if ([...text].length > 4000) return setProblem(t('err_too_long'));
    if (!state.token && name.trim()) session.setName(name);
    session.send(text.trim(), files);
    setText('');
    setFiles([]);
    setProblem(null);
    input.current?.focus();
  };
  const upload = async (list: FileList | null) => {
    if (!list) return;
    // Counted here: the state read above does not change within this selection.
    let taken = files.length + busy;
    for (const f of Array.from(list)) {
      if (taken >= MAX_ATTACHMENTS_PER_MESSAGE) break;
      const bad = checkAttachment(f);
      if (bad) {
        setProblem(t(('err_' + bad) as WKey) + ' (' + f.name + ')');
        continue;
      }
      taken += 1;
      setBusy((n) => n + 1);
      try {
        if (!state.token && name.trim()) session.setName(name);
        const a = await session.upload(f);
        setFiles((x) => [...x, a]);
      } catch (e: any) {
        const key = ('err_' + (e?.message ?? '')) as WKey;
        setProblem(key in WIDGET_DICTS.en ? t(key) : t('err_upload'));
      } finally {
        setBusy((n) => n - 1);
      }
    }
    if (fileInput.current) fileInput.current.value = '';
  };
  return (
    <form
      class="sbw-composer"
      onSubmit={(e) => {
        e.preventDefault();
        send();
      }}
    >
      {!state.token && (
        <label class="sbw-field">
          <span class="sbw-sr">{t('your_name')}</span>
          <input data-testid="widget-name" dir="auto" placeholder={t('your_name')} maxLength={100} autoComplete="name" value={name} onInput={(e) => setName((e.currentTarget as HTMLInputElement).value)} />
        </label>
      )}
      {files.length > 0 && (
        <ul class="sbw-chips">
          {files.map((f) => (
            <li key={f.id}>
              <PaperclipIcon /> {f.name}{' '}
              <button type="button" class="sbw-icon" aria-label={t('remove', { name: f.name })} onClick={() => setFiles(files.filter((x) => x.id !== f.id))}>
                ×
              </button>
            </li>
          ))}
        </ul>
      )}
      {problem && (
        <p class="sbw-problem" role="alert">
          {problem}
        </p>
      )}
      <div class="sbw-row">
        <label class="sbw-field sbw-grow">
          <span class="sbw-sr">{t('message')}</span>
          <textarea
            ref={input}
            dir="auto"
            data-testid="widget-input"
            rows={2}
            maxLength={4000}
            placeholder={t('placeholder')}
            value={text}
            onInput={(e) => {
              setText((e.currentTarget as HTMLTextAreaElement).value);
              session.typing();
            }}
            onKeyDown={(e) => {
              if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
                e.preventDefault();
                send();
              }
            }}
          />
        </label>
        <input ref={fileInput} id="sbw-file" type="file" class="sbw-sr" accept={ACCEPT_ATTRIBUTE} multiple data-testid="widget-file" aria-label={t('attach')} tabIndex={-1} onChange={(e) => upload((e.currentTarget as HTMLInputElement).files)} />
        <button type="button" class="sbw-icon sbw-attach" aria-label={t('attach')} title={t('attach')} disabled={busy > 0} onClick={() => fileInput.current?.click()}>
          {busy ? '…' : <PaperclipIcon />}
        </button>
        <button type="submit" class="sbw-primary" data-testid="widget-send" disabled={busy > 0}>
          {t('send')}
        </button>
      </div>
      {busy > 0 && <p class="sbw-muted">{t('uploading')}</p>}
    </form>
  );
}

function Rating(props: { session: WidgetSession; state: WidgetState; t: T }) {
  const { session, state, t } = props;
  const [score, setScore] = useState(0);
  const [comment, setComment] = useState('');
  const [skipped, setSkipped] = useState(false);
  // Sent and not answered yet: the form waits (a second click would be refused).
  const [sending, setSending] = useState(false);
  if (state.rated || skipped) {
    return (
      <div class="sbw-done" data-testid="widget-done">
        <p>{t('thanks')}</p>
        <button type="button" class="sbw-primary" data-testid="widget-new-chat" onClick={() => session.newConversation()}>
          {t('new_chat')}
        </button>
      </div>
    );
  }
  return (
    <form
      class="sbw-rating"
      data-testid="widget-rating"
      onSubmit={(e) => {
        e.preventDefault();
        if (score && !sending) {
          setSending(true);
          session.rate(score, comment);
          // Not answered (refused, or the connection was lost): it may be sent again.
          setTimeout(() => setSending(false), 10_000);
        }
      }}
    >
      <fieldset>
        <legend>{t('rate_title')}</legend>
        <div class="sbw-stars">
          {[1, 2, 3, 4, 5].map((n) => (
            <label key={n} class={n <= score ? 'sbw-on' : ''}>
              <input type="radio" name="sbw-score" value={n} checked={score === n} data-testid={'widget-star-' + n} onChange={() => setScore(n)} />
              <span aria-hidden="true">★</span>
              <span class="sbw-sr">{t('rate_n', { n })}</span>
            </label>
          ))}
        </div>
      </fieldset>
      <label class="sbw-field">
        <span class="sbw-sr">{t('comment')}</span>
        <textarea rows={2} dir="auto" maxLength={4000} placeholder={t('comment')} value={comment} onInput={(e) => setComment((e.currentTarget as HTMLTextAreaElement).value)} />
      </label>
      <div class="sbw-row">
        <button type="submit" class="sbw-primary" data-testid="widget-rate-submit" disabled={!score || sending}>
          {t('submit_rating')}
        </button>
        <button type="button" class="sbw-link" onClick={() => setSkipped(true)}>
          {t('skip')}
        </button>
      </div>
    </form>
  );
}
