/** The operator desk: presence, offers, conversation list, conversation, side panels. */
import { useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { formatDuration, formatWhen } from '../shared/format';
import { visibleRange, scrollToRow } from '../shared/virtual';
import { listboxTarget } from '../shared/keys';
import { ClockIcon, PaperclipIcon } from '../shared/icons';
import type { LinkState } from '../shared/socket';
import { offerSecondsLeft, offerWaitedMs, offerWindowMs, transferToMe, historySaysMine, sortedConvs, totalUnread, wrapUpSecondsLeft, type Conv, type OpState } from './operator-state';
import { OperatorSession } from './operator-session';
import { PRESENCES, type Channel, type LoginInfo, type MyConversation, type Presence } from './types';
import { Inspector } from './inspector';
import { ConversationPane } from './conversation';
import { describeError, stateText } from './strings';
import { Dialog, RECONNECT_NOW, SHORTCUT_EVENT, useApp, useNow, useStore } from './ui';
import { browserAlerts, type Alerts } from './alerts';

/** A conversation transferred to this operator, shown until opened or dismissed. */
interface TransferIn {
  conversation: number;
  from: string;
  comment: string;
  visitor: string;
}

/** This tab's `sessionStorage`, where the browser allows it. */
function tabStorage(): Storage | null {
  try {
    return window.sessionStorage;
  } catch {
    return null;
  }
}

export function Desk(props: { auth: LoginInfo; onAuthLost: () => void; onLink: (s: LinkState | null) => void; shown?: boolean }) {
  const { api, t, notify } = useApp();
  const session = useMemo(() => {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return new OperatorSession({
      wsBase: proto + '//' + location.host,
      token: props.auth.token,
      storage: tabStorage(),
      storageKey: 'switchboard.desk.pending.' + props.auth.login,
      checkAuth: async () => {
        try {
          await api.get('/api/me');
          return 'ok';
        } catch (e: any) {
          return e?.status === 401 ? 'unauthorized' : 'unknown';
        }
      },
      onAuthLost: props.onAuthLost,
      onLink: props.onLink,
      onNotice: (code, message) => {
        if (code === 'resume_gap') notify(t('notice_resume_gap'), 'info');
        else notify(describeError(t, code, message), 'error');
      },
    });
  }, [props.auth.token]);

  // Viewing: the page is shown and so is the desk (not another tab of the app, where it
  // stays mounted, hidden): only then are new messages seen and read marks sent.
  const shown = props.shown ?? true;
  const shownRef = useRef(shown);
  shownRef.current = shown;
  useEffect(() => {
    session.setViewing(document.visibilityState === 'visible' && shown);
  }, [shown]);

  useEffect(() => {
    session.start();
    const vis = () => session.setViewing(document.visibilityState === 'visible' && shownRef.current);
    // Back online (or asked to): reconnect now, and check that an open socket still lives.
    const online = () => {
      session.link.retryNow();
      session.link.probe();
    };
    document.addEventListener('visibilitychange', vis);
    window.addEventListener('online', online);
    window.addEventListener(RECONNECT_NOW, online);
    vis();
    return () => {
      document.removeEventListener('visibilitychange', vis);
      window.removeEventListener('online', online);
      window.removeEventListener(RECONNECT_NOW, online);
      session.stop();
      props.onLink(null);
    };
  }, [session]);

  const state = useStore(session.store);
  const alerts = useMemo(() => browserAlerts(), []);
  const channels = useChannels(state);
  const [transfers, setTransfers] = useState<TransferIn[]>([]);

  // New offers ring and, in the background, notify. Offers of a snapshot (a reload, a
  // reconnect) were announced when they came; only ones that arrive as events count.
  const seenOffers = useRef(new Set<number>());
  useEffect(() => {
    for (const o of state.offers) {
      if (seenOffers.current.has(o.offer)) continue;
      seenOffers.current.add(o.offer);
      if (o.at == null) continue;
      alerts.alert(t('offer_alert_title'), (o.visitor || t('visitor')) + (o.preview ? ': ' + o.preview : ''), 'offer-' + o.offer);
    }
  }, [state.offers]);

  // A conversation that comes by a transfer says so, with who sent it and their note.
  // Until its history says how it became ours (on a split cluster those entries may
  // follow the assignment by a moment), it is looked at again, for 10 s at most.
  const seenConvs = useRef<Set<number> | null>(null);
  const undecided = useRef(new Map<number, number>());
  useEffect(() => {
    if (!state.me) return;
    if (seenConvs.current == null) {
      // What was already held at the first snapshot is not news.
      seenConvs.current = new Set(state.convs.keys());
      return;
    }
    const now = Date.now();
    for (const c of state.convs.values()) {
      if (seenConvs.current.has(c.id) || !c.loaded) continue;
      const transfer = transferToMe(c, state.me.operator);
      if (!transfer) {
        const since = undecided.current.get(c.id) ?? now;
        if (historySaysMine(c, state.me.operator) || now - since > 10_000) {
          seenConvs.current.add(c.id);
          undecided.current.delete(c.id);
        } else {
          undecided.current.set(c.id, since);
        }
        continue;
      }
      seenConvs.current.add(c.id);
      undecided.current.delete(c.id);
      const visitor = c.visitor || t('visitor');
      setTransfers((list) => [...list.filter((x) => x.conversation !== c.id), { conversation: c.id, visitor, ...transfer }]);
      alerts.alert(t('transfer_alert_title'), t('transfer_in', { from: transfer.from, visitor }) + (transfer.comment ? ': ' + transfer.comment : ''), 'transfer-' + c.id);
    }
  }, [state.convs, state.me]);
  // A conversation that left the desk takes its notice along; if it comes back (a
  // transfer back to us), it is news again.
  useEffect(() => {
    if (state.cursor == null) {
      // Reset (a resume gap): the next snapshot is a first one again, not news.
      seenConvs.current = null;
      undecided.current.clear();
    } else {
      const seen = seenConvs.current;
      if (seen) for (const id of [...seen]) if (!state.convs.has(id)) seen.delete(id);
      for (const id of [...undecided.current.keys()]) if (!state.convs.has(id)) undecided.current.delete(id);
    }
    setTransfers((list) => (list.every((x) => state.convs.has(x.conversation)) ? list : list.filter((x) => state.convs.has(x.conversation))));
  }, [state.convs, state.cursor]);

  // Window title shows what needs attention.
  useEffect(() => {
    const n = state.offers.length + totalUnread(state);
    document.title = (n ? '(' + n + ') ' : '') + t('app_title');
  }, [state.offers.length, state.convs, t]);

  // Keyboard (SHORTCUTS): Alt+A accepts the oldest offer, Alt+D declines it, Alt+↓/↑
  // moves to the next or previous conversation, Alt+T transfers and Alt+C closes the open
  // one, and "?" (outside a text field) or Alt+H shows them all.
  const [help, setHelp] = useState(false);
  useEffect(() => {
    const onKey = (e: KeyboardEvent) => {
      const typing = (e.target as HTMLElement | null)?.closest?.('input, textarea, select, [contenteditable="true"]');
      if (!e.altKey && !e.ctrlKey && !e.metaKey && e.key === '?' && !typing) {
        e.preventDefault();
        setHelp((h) => !h);
        return;
      }
      if (e.key === 'Escape') setHelp(false);
      if (!e.altKey || e.ctrlKey || e.metaKey) return;
      const k = e.code.startsWith('Key') ? e.code.slice(3).toLowerCase() : e.key.toLowerCase();
      const s = session.store.get();
      if (k === 'a' || k === 'd') {
        const first = s.offers[0];
        if (!first) return;
        e.preventDefault();
        (k === 'a' ? session.accept(first.offer) : session.decline(first.offer)).catch((err) => notify(describeError(t, err.code, err.message), 'error'));
      } else if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
        const list = sortedConvs(s);
        if (!list.length) return;
        e.preventDefault();
        const at = list.findIndex((c) => c.id === s.selected);
        const step = e.key === 'ArrowDown' ? 1 : list.length - 1;
        session.select(list[at < 0 ? 0 : (at + step) % list.length].id);
      } else if ((k === 't' || k === 'c') && s.selected != null) {
        e.preventDefault();
        window.dispatchEvent(new CustomEvent(SHORTCUT_EVENT, { detail: k === 't' ? 'transfer' : 'close' }));
      } else if (k === 'h') {
        e.preventDefault();
        setHelp((h) => !h);
      }
    };
    window.addEventListener('keydown', onKey);
    return () => window.removeEventListener('keydown', onKey);
  }, [session, t]);

  return (
    <div class="desk" data-testid="desk">
      <aside class="desk-side" aria-label={t('sidebar')}>
        <PresenceBar session={session} state={state} alerts={alerts} />
        {transfers.map((x) => (
          <div key={x.conversation} class="transfer-note" role="status" data-testid="transfer-notice" data-conversation={x.conversation}>
            <p>
              <strong>{t('transfer_in', { from: x.from, visitor: x.visitor })}</strong>
              {x.comment && <span class="transfer-comment">“{x.comment}”</span>}
            </p>
            <div class="row">
              <button
                type="button"
                class="primary"
                data-testid="transfer-open"
                onClick={() => {
                  session.select(x.conversation);
                  setTransfers((l) => l.filter((y) => y.conversation !== x.conversation));
                }}
              >
                {t('open')}
              </button>
              <button type="button" class="ghost" data-testid="transfer-dismiss" onClick={() => setTransfers((l) => l.filter((y) => y.conversation !== x.conversation))}>
                {t('dismiss')}
              </button>
            </div>
          </div>
        ))}
        <Offers session={session} state={state} />
        <ConvList session={session} state={state} />
        <MyHistory session={session} state={state} />
      </aside>
      <ConversationPane session={session} state={state} auth={props.auth} channels={channels} />
      {help && <ShortcutsHelp onClose={() => setHelp(false)} />}
    </div>
  );
}

/**
 * The channels (their names, and which are messengers), read when the desk starts and
 * again when a conversation comes from a channel not among them (one made since): once
 * per such set of channels, so one that stays unknown costs no more requests.
 */
function useChannels(state: OpState): Channel[] | null {
  const { api } = useApp();
  const [channels, setChannels] = useState<Channel[] | null>(null);
  const missing = channels
    ? [...new Set([...state.convs.values()].map((c) => c.channel).filter((id) => id && !channels.some((x) => x.id === id)))].sort().join(' ')
    : '';
  useEffect(() => {
    api
      .get<{ channels: Channel[] }>('/api/channels')
      .then((r) => setChannels(r.channels ?? []))
      .catch(() => setChannels((known) => known ?? []));
  }, [missing]);
  return channels;
}

/** Every desk shortcut, as the help overlay lists them. */
export const SHORTCUTS: [string, string][] = [
  ['Alt+A', 'shortcut_accept'],
  ['Alt+D', 'shortcut_decline'],
  ['Alt+↓ / Alt+↑', 'shortcut_next'],
  ['Alt+T', 'shortcut_transfer'],
  ['Alt+C', 'shortcut_close'],
  ['/', 'shortcut_templates'],
  ['? / Alt+H', 'shortcut_help'],
];

function ShortcutsHelp(props: { onClose: () => void }) {
  const { t } = useApp();
  return (
    <Dialog title={t('shortcuts')} onClose={props.onClose}>
      <table class="table" data-testid="shortcuts-help">
        <tbody>
          {SHORTCUTS.map(([keys, what]) => (
            <tr key={keys}>
              <th scope="row">
                <kbd class="kbd">{keys}</kbd>
              </th>
              <td>{t(what as any)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </Dialog>
  );
}

function PresenceBar(props: { session: OperatorSession; state: OpState; alerts: Alerts }) {
  const { t, notify } = useApp();
  const now = useNow(1000);
  const { state, session, alerts } = props;
  const [muted, setMuted] = useState(alerts.muted);
  const [choosing, setChoosing] = useState(false);
  // Going offline while holding conversations: asked first, as they stay assigned
  // and their customers wait for an answer.
  const [confirmOffline, setConfirmOffline] = useState(false);
  const set = (p: Presence) => {
    // Going online is a click: the moment to ask for desktop notifications.
    if (p === 'online') alerts.askPermission();
    return session.setPresence(p).catch((e) => {
      notify(e.code === 'bad_frame' || e.code === 'invalid' ? t('presence_unsupported', { status: t(('presence_' + p) as any) }) : describeError(t, e.code, e.message), 'error');
    });
  };
  return (
    <section class="panel presence" aria-labelledby="presence-h">
      <h2 id="presence-h" class="panel-title">
        {state.me ? state.me.name : t('connecting')}
        {state.me && (
          <span class="muted small">
            {' '}
            · {t('capacity_of', { load: state.convs.size, capacity: state.me.capacity })}
          </span>
        )}
      </h2>
      <button
        type="button"
        class="ghost small mute"
        data-testid="mute-toggle"
        aria-pressed={muted}
        onClick={() => {
          alerts.setMuted(!muted);
          setMuted(!muted);
        }}
      >
        {muted ? t('sound_off') : t('sound_on')}
      </button>
      <div class="seg" role="group" aria-label={t('presence')}>
        {PRESENCES.map((p) => (
          <button
            type="button"
            key={p}
            class={'seg-btn presence-' + p}
            aria-pressed={state.presence === p}
            data-testid={'presence-' + p}
            disabled={!state.me}
            aria-expanded={p === 'break' && state.pauseReasons.length ? choosing : undefined}
            onClick={() =>
              p === 'break' && state.pauseReasons.length
                ? setChoosing(!choosing)
                : p === 'offline' && state.convs.size > 0 && state.presence !== 'offline'
                  ? setConfirmOffline(true)
                  : set(p)
            }
          >
            <span class={'dot dot-' + p} aria-hidden="true" />
            {t(('presence_' + p) as any)}
          </button>
        ))}
      </div>
      {confirmOffline && (
        <Dialog title={t('offline_confirm_title')} testid="offline-confirm" onClose={() => setConfirmOffline(false)}>
          <p>{t('offline_confirm_text', { count: state.convs.size })}</p>
          <div class="row">
            <button
              type="button"
              class="danger"
              data-testid="offline-confirm-go"
              onClick={() => {
                setConfirmOffline(false);
                set('offline');
              }}
            >
              {t('offline_confirm_go')}
            </button>
            <button type="button" data-testid="offline-confirm-stay" onClick={() => setConfirmOffline(false)}>
              {t('cancel')}
            </button>
          </div>
        </Dialog>
      )}
      {choosing && (
        // A break is taken for one of the reasons the admin configured.
        <div class="row wrap" role="group" aria-label={t('break_reason')} data-testid="break-reasons">
          {state.pauseReasons.map((reason) => (
            <button
              type="button"
              key={reason}
              class="small-btn"
              data-testid="break-reason"
              onClick={() => {
                setChoosing(false);
                session.takeBreak(reason).catch((e) => notify(describeError(t, e.code, e.message), 'error'));
              }}
            >
              {reason}
            </button>
          ))}
        </div>
      )}
      <p class="muted small" data-testid="presence-current" data-presence={state.presence}>
        {t('in_status', { status: t(('presence_' + state.presence) as any), time: formatDuration(state.presenceSince ? Math.max(0, now + state.clockSkew - state.presenceSince) : 0) })}
        {state.presence === 'break' && state.presenceReason ? <span data-testid="break-current"> · {state.presenceReason}</span> : null}
      </p>
      {wrapUpSecondsLeft(state, now) > 0 && (
        // After a close: no offer until the wrap-up runs out or they say they are ready.
        <div class="wrap-up" role="status" data-testid="wrap-up">
          <span>{t('wrap_up_left', { time: formatDuration(wrapUpSecondsLeft(state, now) * 1000) })}</span>
          <button type="button" class="primary small-btn" data-testid="wrap-up-ready" onClick={() => session.ready().catch((e) => notify(describeError(t, e.code, e.message), 'error'))}>
            {t('ready')}
          </button>
        </div>
      )}
      {state.presenceReason === 'disconnected' && state.presence === 'away' && !state.awayAfterMiss && (
        // Set away by the server while no desk was connected: say so until they act.
        <div class="missed" role="alert" data-testid="disconnected-banner">
          <p>{t('notice_set_away_disconnected')}</p>
          <button type="button" class="primary" data-testid="disconnected-go-online" onClick={() => set('online')}>
            {t('go_online')}
          </button>
        </div>
      )}
      {state.unsent.length > 0 && (
        // Replies a conversation that left this desk did not take: their text stays
        // here until the operator has copied what they need.
        <div class="missed" role="alert" data-testid="unsent-banner">
          <p>{t('notice_unsent')}</p>
          <ul>
            {state.unsent.map((p) => (
              <li key={p.key} data-testid="unsent-reply">
                <span class="muted small">{t('unsent_to', { id: p.conversation })}</span> <span class="text">{p.text}</span>
              </li>
            ))}
          </ul>
          <button type="button" class="primary" data-testid="unsent-dismiss" onClick={() => session.dismissUnsent()}>
            {t('dismiss')}
          </button>
        </div>
      )}
      {state.awayAfterMiss && state.presence === 'away' && (
        // Stays until the operator acts: a toast that fades would leave them away unknowingly.
        <div class="missed" role="alert" data-testid="missed-offer-banner">
          <p>{t('notice_offer_missed')}</p>
          <button type="button" class="primary" data-testid="missed-go-online" onClick={() => set('online')}>
            {t('go_online')}
          </button>
        </div>
      )}
    </section>
  );
}

function Offers(props: { session: OperatorSession; state: OpState }) {
  const { t, notify } = useApp();
  const now = useNow(500);
  const { state, session } = props;
  const [busy, setBusy] = useState<number | null>(null);
  const act = (offer: number, accept: boolean) => {
    setBusy(offer);
    (accept ? session.accept(offer) : session.decline(offer))
      .catch((e) => notify(describeError(t, e.code, e.message), 'error'))
      .finally(() => setBusy(null));
  };
  const latest = state.offers[state.offers.length - 1];
  return (
    <section class="panel offers" aria-labelledby="offers-h">
      <h2 id="offers-h" class="panel-title">
        {t('offers')} {state.offers.length ? <span class="badge">{state.offers.length}</span> : null}
      </h2>
      <p class="sr-only" aria-live="assertive" data-testid="offer-announcement">
        {latest ? t('offer_announce', { visitor: latest.visitor || t('visitor'), group: latest.group }) : ''}
      </p>
      {!state.offers.length && <p class="empty small">{t('no_offers')}</p>}
      <ul class="offer-list">
        {state.offers.map((o, i) => {
          const left = offerSecondsLeft(o, now);
          const total = Math.max(1, offerWindowMs(o) / 1000);
          return (
            <li key={o.offer} class="offer" data-testid="offer" data-conversation={o.conversation}>
              <div class="offer-head">
                <strong>{o.visitor || t('visitor')}</strong>
                <span class="muted small">
                  #{o.conversation} · {o.group}
                </span>
                <span class={'countdown' + (left <= 5 ? ' urgent' : '')} data-testid="offer-countdown" aria-label={t('seconds_left', { n: left })}>
                  {left}s
                </span>
              </div>
              <div class="offer-context muted small">
                {o.channel && <span class="offer-channel" data-testid="offer-channel">{o.channel}</span>}
                {(() => {
                  const waited = offerWaitedMs(o, now);
                  return waited == null ? null : <span data-testid="offer-waited">{t('offer_waited', { time: formatDuration(waited) })}</span>;
                })()}
              </div>
              {o.preview && (
                <p class="offer-preview" data-testid="offer-preview">
                  “{o.preview}”
                </p>
              )}
              <div class="bar" aria-hidden="true">
                <span style={{ width: Math.min(100, (100 * left) / total) + '%' }} />
              </div>
              <div class="row">
                <button
                  type="button"
                  class="primary"
                  data-testid="offer-accept"
                  disabled={busy === o.offer || left === 0}
                  aria-keyshortcuts={i === 0 ? 'Alt+A' : undefined}
                  onClick={() => act(o.offer, true)}
                >
                  {t('accept')}
                  {i === 0 && <kbd class="kbd">Alt+A</kbd>}
                </button>
                <button
                  type="button"
                  data-testid="offer-decline"
                  disabled={busy === o.offer || left === 0}
                  aria-keyshortcuts={i === 0 ? 'Alt+D' : undefined}
                  onClick={() => act(o.offer, false)}
                >
                  {t('decline')}
                </button>
              </div>
            </li>
          );
        })}
      </ul>
    </section>
  );
}

const ROW = 58;

/**
 * The conversation list: a listbox that is itself the Tab stop (the rows come and go as
 * the list scrolls, so focus cannot live on a row). The active row is announced with
 * aria-activedescendant; arrows, Home/End and PageUp/PageDown move it and open that
 * conversation; Enter or Space opens the active row.
 */
export function ConvList(props: { session: OperatorSession; state: OpState }) {
  const { t } = useApp();
  const now = useNow(1000);
  const { state, session } = props;
  const list = useMemo(() => sortedConvs(state), [state.convs]);
  const box = useRef<HTMLDivElement>(null);
  const [scroll, setScroll] = useState(0);
  const [height, setHeight] = useState(400);
  const [active, setActive] = useState<number | null>(null);
  const [focused, setFocused] = useState(false);
  useEffect(() => {
    const el = box.current!;
    const ro = new ResizeObserver(() => setHeight(el.clientHeight));
    ro.observe(el);
    setHeight(el.clientHeight || 400);
    return () => ro.disconnect();
  }, []);
  const range = visibleRange(scroll, height, ROW, list.length);
  const indexOf = (id: number | null) => (id == null ? -1 : list.findIndex((c) => c.id === id));
  // The active row: the one the keyboard last reached, else the open conversation.
  let activeIndex = indexOf(active);
  if (activeIndex < 0) activeIndex = indexOf(state.selected);
  const firstVisible = () => Math.min(list.length - 1, Math.floor(scroll / ROW));
  const isVisible = (i: number) => i >= 0 && i * ROW >= scroll - ROW / 2 && (i + 1) * ROW <= scroll + height + ROW / 2;
  const reveal = (i: number) => {
    const el = box.current!;
    const top = scrollToRow(i, el.scrollTop, el.clientHeight, ROW);
    if (top != null) {
      el.scrollTop = top;
      setScroll(top);
    }
  };
  const go = (i: number) => {
    const c = list[i];
    if (!c) return;
    setActive(c.id);
    session.select(c.id);
    reveal(i);
  };
  // Whatever opens a conversation (a click, an accepted offer) makes it the active row.
  useEffect(() => setActive(null), [state.selected]);
  const activeRendered = activeIndex >= range.start && activeIndex < range.end;
  return (
    <section class="panel convs" aria-labelledby="convs-h">
      <h2 id="convs-h" class="panel-title">
        {t('conversations')} <span class="muted small">({list.length})</span>
      </h2>
      <div
        ref={box}
        class={'vlist' + (focused ? ' focused' : '')}
        data-testid="conv-list"
        role={list.length ? 'listbox' : undefined}
        aria-labelledby={list.length ? 'convs-h' : undefined}
        aria-activedescendant={list.length && activeRendered ? 'conv-opt-' + list[activeIndex].id : undefined}
        tabIndex={list.length ? 0 : undefined}
        onScroll={(e) => setScroll((e.currentTarget as HTMLElement).scrollTop)}
        onFocus={(e) => {
          if (e.target !== e.currentTarget) return;
          setFocused(true);
          // Coming in with the open row out of sight (or none open): start at the first
          // row on screen rather than jumping the list.
          if (list.length && !isVisible(activeIndex)) setActive(list[firstVisible()].id);
        }}
        onBlur={() => setFocused(false)}
        onMouseDown={(e) => delete (e.currentTarget as HTMLElement).dataset.nav}
        onKeyDown={(e) => {
          if (e.altKey || e.ctrlKey || e.metaKey) return;
          // Keyboard navigation keeps focus here (the composer does not take it).
          (e.currentTarget as HTMLElement).dataset.nav = 'keys';
          if ((e.key === 'Enter' || e.key === ' ') && activeIndex >= 0) {
            e.preventDefault();
            go(activeIndex);
            return;
          }
          // Arrows start from the active row if it is in sight, else from the first row
          // on screen (after the list was scrolled away with the mouse).
          const base = isVisible(activeIndex) ? activeIndex : -1;
          const to =
            base < 0 && (e.key === 'ArrowDown' || e.key === 'ArrowUp')
              ? firstVisible()
              : listboxTarget(e.key, base < 0 ? firstVisible() : base, list.length, Math.floor(height / ROW));
          if (to == null) return;
          e.preventDefault();
          go(to);
        }}
      >
        {!list.length && <p class="empty small pad">{t('no_conversations')}</p>}
        <div aria-hidden="true" style={{ height: range.padTop + 'px' }} />
        {list.slice(range.start, range.end).map((c, k) => (
          <ConvRow
            key={c.id}
            c={c}
            now={now}
            skew={state.clockSkew}
            pos={range.start + k + 1}
            size={list.length}
            selected={state.selected === c.id}
            active={focused && range.start + k === activeIndex}
            onSelect={() => {
              setActive(c.id);
              session.select(c.id);
            }}
          />
        ))}
        <div aria-hidden="true" style={{ height: range.padBottom + 'px' }} />
      </div>
    </section>
  );
}

function ConvRow(props: { c: Conv; now: number; skew: number; pos: number; size: number; selected: boolean; active: boolean; onSelect: () => void }) {
  const { t } = useApp();
  const { c, now } = props;
  // How long it has waited, by the server's clock (`waitingSince` is the server's time).
  const waited = c.waitingSince != null ? Math.max(0, now + props.skew - c.waitingSince) : 0;
  // The newest message (a note or a system entry after it does not replace it).
  let last = undefined as (typeof c.entries)[number] | undefined;
  for (let i = c.entries.length - 1; i >= 0 && !last; i--) if (c.entries[i].kind === 'message') last = c.entries[i];
  const preview = last?.kind === 'message' ? last.text || (last.attachments?.length ? <PaperclipIcon /> : '') : '';
  return (
    <div
      role="option"
      id={'conv-opt-' + c.id}
      aria-selected={props.selected}
      aria-posinset={props.pos}
      aria-setsize={props.size}
      class={'conv' + (props.selected ? ' selected' : '') + (props.active ? ' active' : '') + (c.unread ? ' has-unread' : '')}
      style={{ height: ROW + 'px' }}
      data-testid="conv-item"
      data-conv={c.id}
      onClick={props.onSelect}
    >
      <div class="conv-top">
        <strong class="conv-name">{c.visitor || t('visitor')}</strong>
        <span class="muted small">#{c.id}</span>
        {c.unread > 0 && (
          <span class="badge" data-testid="unread-badge" aria-label={t('unread_n', { n: c.unread })}>
            {c.unread}
          </span>
        )}
      </div>
      <div class="conv-bottom">
        <span class="conv-preview">{c.typingUntil > now ? t('typing_short') : preview}</span>
        {c.waitingSince != null && (
          <span class={'wait' + (waited > 60000 ? ' late' : '')} data-testid="waiting" title={t('waiting')}>
            <ClockIcon /> {formatDuration(waited)}
          </span>
        )}
      </div>
    </div>
  );
}

/**
 * My conversations beyond the open ones: the recently closed ones, and a search over
 * everything I handled (number, customer, text, notes). A closed one opens read-only,
 * where a note can still be added; an open one of mine opens on the desk.
 */
function MyHistory(props: { session: OperatorSession; state: OpState }) {
  const { t, api, lang } = useApp();
  const [query, setQuery] = useState('');
  const [asked, setAsked] = useState('');
  const [rows, setRows] = useState<MyConversation[] | null>(null);
  const [next, setNext] = useState<number | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [open, setOpen] = useState<number | null>(null);
  // Only the newest request's answer counts: an older one arriving late is dropped.
  const latest = useRef(0);
  const load = (q: string, before: number | null) => {
    const ticket = ++latest.current;
    const params = new URLSearchParams({ limit: '20' });
    if (q) params.set('q', q);
    if (before != null) params.set('before', String(before));
    api
      .get<{ conversations: MyConversation[]; next_before: number | null }>('/api/my/conversations?' + params)
      .then((r) => {
        if (ticket !== latest.current) return;
        setRows((old) => (before != null && old ? [...old, ...r.conversations] : r.conversations));
        setNext(r.next_before);
        setError(null);
      })
      .catch((e) => ticket === latest.current && setError(describeError(t, e.code, e.message)));
  };
  // The recently closed list follows the desk: a conversation leaving it is news here
  // (one closed while another is taken leaves the count as it was: the released list
  // moves all the same).
  const releases = props.state.releases;
  const held = props.state.convs.size;
  useEffect(() => {
    if (!asked) load('', null);
  }, [held, releases, asked]);
  const shown = rows ? (asked ? rows : rows.filter((r) => r.state === 'closed')) : null;
  return (
    <section class="panel history" aria-labelledby="hist-h">
      <h2 id="hist-h" class="panel-title">
        {asked ? t('search_results') : t('recently_closed')}
      </h2>
      <form
        class="row"
        role="search"
        onSubmit={(e) => {
          e.preventDefault();
          const q = query.trim();
          setAsked(q);
          setRows(null);
          load(q, null);
        }}
      >
        <label class="sr-only" for="hist-q">
          {t('search_mine')}
        </label>
        <input id="hist-q" type="search" class="grow" data-testid="history-search" placeholder={t('search_mine')} maxLength={200} value={query} onInput={(e) => {
          const v = (e.currentTarget as HTMLInputElement).value;
          setQuery(v);
          if (!v.trim() && asked) setAsked('');
        }} />
        <button type="submit">{t('search')}</button>
      </form>
      {error && <p class="error small">{error}</p>}
      {shown && !shown.length && <p class="empty small">{asked ? t('no_results') : t('none')}</p>}
      <ul class="history-list" data-testid="history-list">
        {shown?.map((r) => (
          <li key={r.conversation}>
            <button
              type="button"
              class="history-row"
              data-testid="history-item"
              data-conv={r.conversation}
              data-state={r.state}
              onClick={() => (r.mine && props.state.convs.has(r.conversation) ? props.session.select(r.conversation) : setOpen(r.conversation))}
            >
              <span class="conv-top">
                <strong class="conv-name">{r.visitor || t('visitor')}</strong>
                <span class="muted small">
                  #{r.conversation} · {stateText(t, r.state)}
                </span>
              </span>
              <span class="conv-bottom">
                <span class="conv-preview">{r.preview ? r.preview.text || (r.preview.attachments ? '📎' : '') : ''}</span>
                <span class="muted small">{formatWhen(r.closed_at ?? r.last_at ?? r.created_at, lang)}</span>
              </span>
            </button>
          </li>
        ))}
      </ul>
      {asked && next != null && (
        <button type="button" class="ghost small" data-testid="history-more" onClick={() => load(asked, next)}>
          {t('search_more')}
        </button>
      )}
      {open != null && (
        <Dialog title={t('conversation_read_only', { id: open })} testid="history-dialog" onClose={() => setOpen(null)}>
          <Inspector id={open} canReassign={false} canNote={true} />
        </Dialog>
      )}
    </section>
  );
}
