/** The open conversation: header and actions, history, typing, composer, side panels. */
import { uid } from '../shared/ids';
import { useEffect, useLayoutEffect, useRef, useState } from 'preact/hooks';
import { ACCEPT_ATTRIBUTE, checkAttachment, contentTypeOf, MAX_ATTACHMENTS_PER_MESSAGE, type Attachment } from '../shared/files';
import { formatDuration } from '../shared/format';
import { PaperclipIcon } from '../shared/icons';
import { adapterOf, deliveryOf, isMessenger, pendingOf, type Conv, type OpState } from './operator-state';
import type { OperatorSession } from './operator-session';
import type { AdapterKind, Channel, ConversationDoc, LoginInfo } from './types';
import { EntryView, operatorNames } from './entries';
import { fillPlaceholders, searchTemplates, unfilledPlaceholders } from './templates';
import type { Template } from './types';
import { carried, messageProblem, textCounter } from './forms';
import { ClientCard, CloseDialog, TemplatesPanel, TransferDialog } from './panels';
import { describeError, messageProblemText } from './strings';
import { SHORTCUT_EVENT, TabList, TabPanel, useApp, useNow } from './ui';
import { enc } from './api';

const SIDE_TABS = ['card', 'templates'] as const;

/**
 * The open conversation as REST shows it, read once each time one is opened: for the
 * client card, the customer's id on a messenger, and what the outbox made of the
 * messages so far (the feed's `delivery` events carry on from there).
 */
function useConversationDoc(session: OperatorSession, id: number | undefined): { doc: ConversationDoc | null; error: string | null } {
  const { t, api } = useApp();
  const [doc, setDoc] = useState<ConversationDoc | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    setDoc(null);
    setError(null);
    if (id == null) return;
    let live = true;
    api.get<ConversationDoc>('/api/conversations/' + id).then(
      (d) => {
        if (!live) return;
        setDoc(d);
        session.setDeliveries(id, d.deliveries ?? []);
      },
      (e) => live && setError(describeError(t, e.code, e.message)),
    );
    return () => {
      live = false;
    };
  }, [id]);
  return { doc: doc?.conversation === id ? doc : null, error };
}

/** `channels`: the channels as the desk read them (null until then), to tell a
 *  messenger conversation from the web chat and name its channel. */
export function ConversationPane(props: { session: OperatorSession; state: OpState; auth: LoginInfo; channels: Channel[] | null }) {
  const { t } = useApp();
  const { state, session } = props;
  const conv = state.selected != null ? state.convs.get(state.selected) : undefined;
  const { doc, error: docError } = useConversationDoc(session, conv?.id);
  const messenger = !!conv && isMessenger(props.channels, conv.channel);
  const [side, setSide] = useState<'card' | 'templates'>('card');
  const [dialog, setDialog] = useState<'transfer' | 'close' | null>(null);
  // Each conversation's unsent text, and whether it is an internal note.
  const drafts = useRef(new Map<number, { text: string; note: boolean }>());
  const [draft, setDraftState] = useState('');
  // Whether the open conversation's composer writes an internal note (held here, so
  // that a note coming back after a failure is shown as a note).
  const [noteMode, setNoteModeState] = useState(false);
  // The conversation on screen: a draft set for another (a note that failed after the
  // operator moved on comes back to its own conversation) is kept for it, not shown here.
  const open = useRef<number | null>(null);
  open.current = conv?.id ?? null;
  const setDraft = (v: string) => {
    if (!conv) return;
    // The open conversation's text is a note exactly when its composer shows note mode.
    const note = open.current === conv.id ? noteMode : drafts.current.get(conv.id)?.note ?? false;
    drafts.current.set(conv.id, { text: v, note });
    if (open.current === conv.id) setDraftState(v);
  };
  // A note whose saving failed comes back to its conversation as a note, unless the
  // operator has written something there since (then they are told, and it stays
  // unsent); `true` when it came back.
  const restoreNote = (id: number, text: string) => {
    if (drafts.current.get(id)?.text) return false;
    drafts.current.set(id, { text, note: true });
    if (open.current === id) {
      setDraftState(text);
      setNoteModeState(true);
    }
    return true;
  };
  // Each conversation's uploaded files waiting to go with its next reply (an upload that
  // ends after the operator moved on lands with its own conversation).
  const draftFiles = useRef(new Map<number, Attachment[]>());
  const [openFiles, setOpenFiles] = useState<Attachment[]>([]);
  const setFilesOf = (id: number, update: (files: Attachment[]) => Attachment[]) => {
    const next = update(draftFiles.current.get(id) ?? []);
    if (next.length) draftFiles.current.set(id, next);
    else draftFiles.current.delete(id);
    if (open.current === id) setOpenFiles(next);
  };
  const setNoteDraft = (id: number, note: boolean) => {
    drafts.current.set(id, { text: drafts.current.get(id)?.text ?? '', note });
    if (open.current === id) setNoteModeState(note);
  };
  // Layout effects: they run as the new conversation is committed, before the next key
  // press can be handled, so a shortcut right after switching is never undone by the
  // reset or sent to the previous conversation's listener.
  useLayoutEffect(() => {
    const saved = conv ? drafts.current.get(conv.id) : undefined;
    setDraftState(saved?.text ?? '');
    // A conversation opens in reply mode unless what waits in it is a note (and the map
    // says what is shown).
    const note = !!saved?.text && saved.note;
    if (conv) drafts.current.set(conv.id, { text: saved?.text ?? '', note });
    setNoteModeState(note);
    setOpenFiles(conv ? draftFiles.current.get(conv.id) ?? [] : []);
    setDialog(null);
  }, [conv?.id]);
  // Alt+T and Alt+C from anywhere on the desk (see SHORTCUTS in desk.tsx).
  useLayoutEffect(() => {
    const open = (e: Event) => {
      const what = (e as CustomEvent<string>).detail;
      if (conv && (what === 'transfer' || what === 'close')) setDialog(what);
    };
    window.addEventListener(SHORTCUT_EVENT, open);
    return () => window.removeEventListener(SHORTCUT_EVENT, open);
  }, [conv?.id]);

  // Read marks: tell the visitor what we have seen.
  useEffect(() => {
    if (conv && state.viewing && conv.seenSeq > 0) session.markRead(conv.id, conv.seenSeq);
  }, [conv?.id, conv?.seenSeq, state.viewing]);

  if (!conv) {
    return (
      <section class="pane pane-empty" data-testid="conversation-empty" aria-label={t('conversation')}>
        <p class="empty">{state.convs.size ? t('pick_conversation') : t('no_conversations_hint')}</p>
      </section>
    );
  }
  const insert = (text: string) => setDraft(draft ? draft.replace(/\s*$/, '') + (draft.trim() ? ' ' : '') + text : text);
  return (
    <>
      <section class="pane" data-testid="conversation-view" data-conv={conv.id} aria-labelledby="conv-title">
        <ConvHeader
          conv={conv}
          skew={state.clockSkew}
          channel={messenger ? props.channels?.find((c) => c.id === conv.channel)?.name ?? conv.channel : null}
          identity={doc?.visitor.id ?? null}
          onTransfer={() => setDialog('transfer')}
          onClose={() => setDialog('close')}
        />
        <History conv={conv} state={state} messenger={messenger} session={session} />
        <Composer
          key={conv.id}
          session={session}
          conv={conv}
          adapter={adapterOf(props.channels, conv.channel)}
          draft={draft}
          setDraft={setDraft}
          files={openFiles}
          setFilesOf={setFilesOf}
          noteMode={noteMode}
          setNoteMode={(note) => setNoteDraft(conv.id, note)}
          restoreNote={(text) => restoreNote(conv.id, text)}
          onTemplates={() => setSide('templates')}
          operatorName={state.me?.name}
        />
      </section>
      <aside class="pane-side" aria-label={t('details')}>
        <TabList
          id="side"
          tabs={SIDE_TABS}
          current={side}
          onSelect={setSide}
          label={(x) => (x === 'card' ? t('client_card') : t('templates'))}
          ariaLabel={t('details')}
          testid={(x) => 'tab-' + x}
        />
        <TabPanel id="side" current={side}>
          {side === 'card' ? (
            <ClientCard conv={conv} doc={doc} docError={docError} />
          ) : (
            <TemplatesPanel
              values={{ clientName: conv.visitor, operatorName: state.me?.name, conversationId: conv.id }}
              onInsert={insert}
              draft={draft}
              canEditShared={false}
            />
          )}
        </TabPanel>
      </aside>
      {dialog === 'transfer' && <TransferDialog session={session} conv={conv} me={props.auth.operator} onDone={() => setDialog(null)} />}
      {dialog === 'close' && <CloseDialog session={session} conv={conv} onDone={() => setDialog(null)} />}
    </>
  );
}

/** `channel`: a messenger conversation's channel name (null: the web chat), shown with
 *  the customer's `identity` there (`<channel>:<sender>`) once it is known. */
function ConvHeader(props: { conv: Conv; skew: number; channel: string | null; identity: string | null; onTransfer: () => void; onClose: () => void }) {
  const { t } = useApp();
  const now = useNow(1000);
  const { conv } = props;
  return (
    <header class="pane-head">
      <div>
        <h2 id="conv-title" data-testid="conversation-title">
          {conv.visitor || t('visitor')} <span class="muted">#{conv.id}</span>
        </h2>
        <p class="muted small">
          {props.channel != null && (
            <span class="channel-badge" data-testid="channel-badge" title={t('channel_identity')}>
              <span class="sr-only">{t('channel')}: </span>
              {props.identity ? props.channel + ' · ' + props.identity : props.channel}
            </span>
          )}
          {[props.channel == null ? conv.channel : '', conv.group].filter(Boolean).join(' · ')}
          {conv.waitingSince != null && <span class="wait"> · {t('waiting_for', { time: formatDuration(Math.max(0, now + props.skew - conv.waitingSince)) })}</span>}
        </p>
      </div>
      <div class="row">
        <button type="button" data-testid="transfer-button" onClick={props.onTransfer}>
          {t('transfer')}
        </button>
        <button type="button" class="danger" data-testid="close-button" onClick={props.onClose}>
          {t('close_conversation')}
        </button>
      </div>
    </header>
  );
}

function History(props: { conv: Conv; state: OpState; messenger: boolean; session: OperatorSession }) {
  const { t } = useApp();
  const now = useNow(1000);
  const { conv, state } = props;
  const log = useRef<HTMLOListElement>(null);
  const pending = pendingOf(state, conv.id);
  const stick = useRef(true);
  useEffect(() => {
    const el = log.current;
    if (el && stick.current) el.scrollTop = el.scrollHeight;
  }, [conv.entries.length, pending.length, conv.id]);
  const me = state.me?.operator;
  const names = operatorNames(conv.entries);
  return (
    <>
      <ol
        ref={log}
        class="log"
        aria-live="polite"
        aria-relevant="additions"
        aria-label={t('history')}
        data-testid="message-log"
        tabIndex={0}
        onScroll={(e) => {
          const el = e.currentTarget as HTMLElement;
          stick.current = el.scrollHeight - el.scrollTop - el.clientHeight < 40;
        }}
      >
        {!conv.loaded && !conv.entries.length && <li class="sys">{t('loading')}</li>}
        {conv.entries.map((e) => {
          const mine = e.kind === 'message' && e.from === 'operator' && e.operator === me;
          const delivery = mine || e.kind === 'notice' ? deliveryOf(conv, e, props.messenger) : undefined;
          return <EntryView key={e.seq} e={e} mine={mine} delivery={delivery} operatorId={me} visitor={conv.visitor} names={names} />;
        })}
        {pending.map((p) => (
          <li key={p.key} class={'msg msg-mine pending' + (p.state === 'failed' ? ' failed' : '')} data-testid="message-pending">
            <span class="who">{state.me?.name}</span>
            {p.text && <span class="text">{p.text}</span>}
            {p.attachments.length > 0 && <span class="atts">
                <PaperclipIcon /> {p.attachments.map((a) => a.name).join(', ')}
              </span>}
            <span class="meta">
              <span class={'delivery delivery-' + p.state} data-testid="delivery">
                {p.state === 'failed' ? t('delivery_failed') + (p.error ? ' (' + describeError(t, p.error, '') + ')' : '') : t('delivery_sending')}
              </span>
              {p.state === 'failed' && (
                // Sent again with its own key (a copy the server took already is not
                // written twice), or given up.
                <>
                  {' '}
                  <button type="button" class="link" data-testid="pending-retry" onClick={() => props.session.retry(p.key)}>
                    {t('retry')}
                  </button>{' '}
                  <button type="button" class="link" data-testid="pending-discard" onClick={() => props.session.discard(p.key)}>
                    {t('discard')}
                  </button>
                </>
              )}
            </span>
          </li>
        ))}
      </ol>
      <p class="typing" aria-live="polite" data-testid="typing-indicator">
        {conv.typingUntil > now ? t('visitor_typing', { name: conv.visitor || t('visitor') }) : ''}
      </p>
    </>
  );
}

/** `adapter`: the adapter of the conversation's channel (null: the web chat): files go
 *  to email, Telegram and WhatsApp customers only (WhatsApp one per message, and on both
 *  messengers the text with them is their caption: at most 1024 characters), and
 *  Messenger takes at most 2000 characters; the composer says so before sending rather
 *  than have the server refuse it. */
function Composer(props: {
  session: OperatorSession;
  conv: Conv;
  adapter: AdapterKind | null;
  draft: string;
  setDraft: (v: string) => void;
  /** The files uploaded for the next reply, kept per conversation by the pane. */
  files: Attachment[];
  setFilesOf: (conversation: number, update: (files: Attachment[]) => Attachment[]) => void;
  /** Whether the composer writes an internal note, and setting it. */
  noteMode: boolean;
  setNoteMode: (note: boolean) => void;
  /** Puts a note that failed back as the conversation's note draft; false if not. */
  restoreNote: (text: string) => boolean;
  onTemplates: () => void;
  operatorName?: string;
}) {
  const { t, api, notify } = useApp();
  const { session, conv, draft, setDraft, adapter } = props;
  const filesCarried = carried(adapter).files;
  // Canned responses: "/" at the start of the composer lists the templates matching what
  // follows; arrows move, Enter or Tab inserts, Escape closes.
  const [templates, setTemplates] = useState<Template[] | null>(null);
  const [slashActive, setSlashActive] = useState(0);
  const [slashClosed, setSlashClosed] = useState(false);
  const slashQuery = draft.startsWith('/') && !draft.includes('\n') && !slashClosed ? draft.slice(1) : null;
  useEffect(() => {
    if (slashQuery != null && templates == null) {
      api
        .get<{ templates: Template[] }>('/api/templates')
        .then((r) => setTemplates(r.templates ?? []))
        .catch(() => setTemplates([]));
    }
  }, [slashQuery != null]);
  const slashShown = slashQuery != null && templates ? searchTemplates(templates, slashQuery).slice(0, 8) : [];
  const insertTemplate = (tpl: Template) => {
    setDraft(fillPlaceholders(tpl.text, { clientName: conv.visitor, operatorName: props.operatorName, conversationId: conv.id }, null));
    setSlashActive(0);
    input.current?.focus();
  };
  // Internal note mode: what is written goes to staff only (POST …/notes), not the customer.
  const { noteMode, setNoteMode } = props;
  const files = props.files;
  const setFiles = (next: Attachment[]) => props.setFilesOf(conv.id, () => next);
  const [uploading, setUploading] = useState(0);
  const [problem, setProblem] = useState<string | null>(null);
  const input = useRef<HTMLTextAreaElement>(null);
  const fileInput = useRef<HTMLInputElement>(null);
  useEffect(() => {
    setProblem(null);
    // Ready to type in the newly opened conversation, unless the operator is moving
    // through the conversation list from the keyboard (the list marks that).
    if ((document.activeElement as HTMLElement | null)?.dataset?.nav !== 'keys') input.current?.focus();
  }, [conv.id]);

  const addNote = () => {
    const text = draft.trim();
    if (!text) return;
    if (text.length > 4000) return setProblem(t('err_too_long'));
    const key = 'note-' + uid();
    const sent = draft;
    setDraft('');
    api.post('/api/conversations/' + conv.id + '/notes', { text, key }).then(
      () => setProblem(null),
      (e: any) => {
        // Nothing is lost: the text comes back to its conversation as a note, with the
        // reason; or, if something was written there since, the reason names it.
        const why = describeError(t, e.code, e.message);
        if (props.restoreNote(sent)) {
          setProblem(why);
          // Told also when the operator has moved on (this composer is gone then).
          notify(why, 'error');
        } else {
          setProblem(why + ': ' + sent);
          notify(why + ': ' + sent, 'error');
        }
      },
    );
    input.current?.focus();
  };

  const send = () => {
    if (noteMode) return addNote();
    // As the send button: a file still uploading would otherwise be left out of the
    // message its text belongs to (the status line says it is uploading).
    if (uploading > 0) return;
    const p = messageProblem(draft, files.length, adapter);
    if (p) {
      setProblem(messageProblemText(t, p, draft, adapter));
      return;
    }
    const unfilled = unfilledPlaceholders(draft);
    if (unfilled.length) {
      setProblem(t('err_unfilled_placeholders', { names: unfilled.join(', ') }));
      return;
    }
    session.sendMessage(conv.id, draft.trim(), files);
    setDraft('');
    setFiles([]);
    setProblem(null);
    input.current?.focus();
  };

  const upload = async (list: FileList | null) => {
    if (!list || !filesCarried) return;
    // The alert speaks about the latest selection only.
    setProblem(null);
    // Counted here: the state read above does not change within this selection (one
    // at a time: the attach button is off while files upload). A failed one is not.
    let taken = files.length;
    // The conversation the files are for, whichever is open when each upload ends.
    const id = conv.id;
    for (const f of Array.from(list)) {
      if (taken >= MAX_ATTACHMENTS_PER_MESSAGE) {
        setProblem(t('err_too_many_files', { n: MAX_ATTACHMENTS_PER_MESSAGE }));
        break;
      }
      const bad = checkAttachment(f);
      if (bad) {
        setProblem(describeError(t, bad, '') + ': ' + f.name);
        continue;
      }
      setUploading((n) => n + 1);
      try {
        const a = await api.request<Attachment>('POST', '/api/attachments?conversation=' + id + '&name=' + enc(f.name), undefined, {
          raw: f,
          contentType: contentTypeOf(f),
        });
        taken += 1;
        props.setFilesOf(id, (x) => [...x, a]);
      } catch (e: any) {
        // Shown next to the attach control (like the checks above) rather than as a
        // passing notice: it stays until the next selection or send.
        setProblem(t('upload_failed', { name: f.name }) + ': ' + describeError(t, e.code, e.message));
      } finally {
        setUploading((n) => n - 1);
      }
    }
    if (fileInput.current) fileInput.current.value = '';
  };

  const id = 'composer-' + conv.id;
  // Notes stay with the staff: only replies are held to the provider's limit (with
  // files, where the text goes as their caption, the caption's).
  const counter = noteMode ? null : textCounter(draft, adapter, files.length);
  return (
    <form
      class={'composer' + (noteMode ? ' composer-note' : '')}
      data-mode={noteMode ? 'note' : 'reply'}
      onSubmit={(e) => {
        e.preventDefault();
        send();
      }}
    >
      {files.length > 0 && (
        <ul class="chips" aria-label={t('attachments')}>
          {files.map((f) => (
            <li key={f.id} class="chip">
              <PaperclipIcon /> {f.name}
              <button type="button" class="ghost" aria-label={t('remove_attachment', { name: f.name })} onClick={() => setFiles(files.filter((x) => x.id !== f.id))}>
                ×
              </button>
            </li>
          ))}
        </ul>
      )}
      <label class="sr-only" for={id}>
        {t('message')}
      </label>
      <textarea
        id={id}
        ref={input}
        data-testid="composer-input"
        rows={3}
        maxLength={4000}
        placeholder={noteMode ? t('note_placeholder') : t('composer_placeholder')}
        value={draft}
        aria-describedby={counter ? id + '-count' : undefined}
        aria-controls={slashShown.length ? id + '-slash' : undefined}
        aria-activedescendant={slashShown.length ? id + '-slash-' + Math.min(slashActive, slashShown.length - 1) : undefined}
        onInput={(e) => {
          const value = (e.currentTarget as HTMLTextAreaElement).value;
          setDraft(value);
          if (!value.startsWith('/')) setSlashClosed(false);
          setSlashActive(0);
          if (!noteMode) session.typing(conv.id);
        }}
        onKeyDown={(e) => {
          if (slashShown.length) {
            const n = slashShown.length;
            if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
              e.preventDefault();
              setSlashActive((i) => (i + (e.key === 'ArrowDown' ? 1 : n - 1)) % n);
              return;
            }
            if ((e.key === 'Enter' && !e.shiftKey && !e.isComposing) || e.key === 'Tab') {
              e.preventDefault();
              insertTemplate(slashShown[Math.min(slashActive, n - 1)]);
              return;
            }
            if (e.key === 'Escape') {
              e.preventDefault();
              setSlashClosed(true);
              return;
            }
          }
          if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
            e.preventDefault();
            send();
          }
        }}
      />
      {slashShown.length > 0 && (
        <ul class="slash-menu" role="listbox" id={id + '-slash'} data-testid="slash-menu" aria-label={t('templates')}>
          {slashShown.map((tpl, i) => (
            <li
              key={tpl.id}
              id={id + '-slash-' + i}
              role="option"
              aria-selected={i === Math.min(slashActive, slashShown.length - 1)}
              class={'slash-option' + (i === Math.min(slashActive, slashShown.length - 1) ? ' active' : '')}
              data-testid="slash-option"
              onMouseDown={(e) => {
                e.preventDefault();
                insertTemplate(tpl);
              }}
            >
              <strong>{tpl.title}</strong> <span class="muted small">{tpl.text.slice(0, 80)}</span>
            </li>
          ))}
        </ul>
      )}
      {counter && (
        <p class={'char-count small' + (counter.over ? ' error' : ' muted')} id={id + '-count'} data-testid="char-count" data-over={String(counter.over)}>
          {t('char_count', { n: counter.length, limit: counter.limit })}
        </p>
      )}
      {problem && (
        <p class="error small" role="alert" data-testid="composer-problem">
          {problem}
        </p>
      )}
      <div class="row composer-actions">
        <input
          ref={fileInput}
          id={id + '-file'}
          type="file"
          class="sr-only"
          multiple
          accept={ACCEPT_ATTRIBUTE}
          data-testid="attach-input"
          aria-label={t('attach')}
          disabled={!filesCarried || uploading > 0}
          tabIndex={-1}
          onChange={(e) => upload((e.currentTarget as HTMLInputElement).files)}
        />
        <label class="note-toggle">
          <input type="checkbox" data-testid="note-mode" checked={noteMode} onChange={(e) => setNoteMode((e.currentTarget as HTMLInputElement).checked)} /> {t('note_mode')}
        </label>
        {/* Off where files are not carried (Messenger, Viber, VK, the Channel API) with
            aria-disabled rather than disabled: it stays focusable, so its explanation is
            heard and its tooltip shown. */}
        <button
          type="button"
          class="ghost"
          data-testid="attach-button"
          disabled={noteMode || uploading > 0}
          aria-disabled={filesCarried ? undefined : 'true'}
          aria-describedby={filesCarried ? undefined : id + '-no-files'}
          title={filesCarried ? undefined : t('files_not_carried')}
          onClick={() => filesCarried && fileInput.current?.click()}
        >
          <PaperclipIcon /> {t('attach')}
        </button>
        <button type="button" class="ghost" onClick={props.onTemplates}>
          {t('templates')}
        </button>
        <span class="muted small grow">{uploading ? t('uploading') : t('enter_to_send')}</span>
        <button type="submit" class="primary" data-testid="send-button" disabled={uploading > 0}>
          {noteMode ? t('add_note') : t('send')}
        </button>
      </div>
      {!filesCarried && (
        <p class="muted small composer-note-line" id={id + '-no-files'} data-testid="attach-unavailable">
          <PaperclipIcon /> {t('files_not_carried')}
        </p>
      )}
    </form>
  );
}

