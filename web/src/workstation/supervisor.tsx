/** The supervisor's live floor: queues, operators, and an inspector for any conversation. */
import { useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { formatDuration, formatWhen } from '../shared/format';
import { floorPlace, longestWaitNow, queuedWaitNow, sinceNow, slaPercent, totals, untilNow, type EmergencyRow, type Floor, type QueueRow } from './floor';
import { FloorFeed } from './floor-feed';
import { Inspector } from './inspector';
import type { Delivery, GroupKpis, LoginInfo } from './types';
import { describeError, refusal } from './strings';
import { Empty, RECONNECT_NOW, reconnectNow, useApp, useNow, usePoller } from './ui';

export function FloorView(props: { auth: LoginInfo }) {
  const { t, api, notify } = useApp();
  const [floor, setFloor] = useState<Floor | null>(null);
  const [mode, setMode] = useState<'socket' | 'poll'>('socket');
  // When the floor shown last changed hands (a frame or a poll): an old one is not live.
  const [updatedAt, setUpdatedAt] = useState(0);
  const [linkOpen, setLinkOpen] = useState(false);
  const [open, setOpen] = useState<number | null>(null);
  const [lookup, setLookup] = useState('');
  // The open conversation's newest seq as the socket announced it (`watched` frames).
  const [pushed, setPushed] = useState<number | undefined>(undefined);
  const now = useNow(1000);
  const feed = useMemo(() => {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let lastError = '';
    return new FloorFeed({
      wsBase: proto + '//' + location.host,
      token: props.auth.token,
      get: (p) => api.get(p),
      onFloor: (f) => {
        setFloor(f);
        setUpdatedAt(Date.now());
      },
      onMode: setMode,
      onWatched: (_id, seq) => setPushed(seq),
      onLink: (s) => setLinkOpen(s.status === 'open'),
      onError: (e: any) => {
        const text = describeError(t, e?.code, e?.message);
        if (text !== lastError) notify(text, 'error');
        lastError = text;
      },
    });
  }, [props.auth.token]);
  useEffect(() => {
    feed.start();
    // Back online: try the socket now instead of waiting out the backoff (polling covers
    // the gap either way).
    const online = () => {
      feed.link.retryNow();
      feed.link.probe();
    };
    window.addEventListener('online', online);
    window.addEventListener(RECONNECT_NOW, online);
    return () => {
      window.removeEventListener('online', online);
      window.removeEventListener(RECONNECT_NOW, online);
      feed.stop();
    };
  }, [feed]);
  useEffect(() => {
    setPushed(undefined);
    feed.watch(open);
  }, [open, feed]);
  const sum = floor ? totals(floor) : null;
  // Live only while the socket is open, or polls keep succeeding (every 2 s) while it is not.
  const live = floor != null && (mode === 'socket' ? linkOpen : now - updatedAt < 6000);
  return (
    <div class={'floor' + (open == null ? ' floor-wide' : '')} data-testid="floor" data-layout={open == null ? 'wide' : 'split'}>
      {floor && !live && (
        <div class="banner" role="alert" data-testid="floor-offline">
          {t('floor_offline', { time: new Date(updatedAt).toLocaleTimeString() })}{' '}
          <button type="button" class="link-btn" data-testid="floor-reconnect-now" onClick={reconnectNow}>
            {t('reconnect_now')}
          </button>
        </div>
      )}
      <section class="panel" aria-labelledby="queues-h">
        <div class="row">
          <h2 id="queues-h" class="panel-title grow">
            {t('queues')}
          </h2>
          {floor && live && (
            <span class="muted small" data-testid="floor-source" data-source={mode}>
              {mode === 'socket' ? t('live') : t('polling')}
            </span>
          )}
        </div>
        {sum && (
          <p class="summary" aria-live="polite">
            {t('floor_summary', { waiting: sum.waiting, offered: sum.offered, online: sum.online, load: sum.load, capacity: sum.capacity })}
          </p>
        )}
        {!floor ? (
          <p class="muted">{t('loading')}</p>
        ) : (
          <table class="table" data-testid="queues-table">
            <thead>
              <tr>
                <th scope="col">{t('group')}</th>
                <th scope="col">{t('waiting_col')}</th>
                <th scope="col">{t('offered')}</th>
                <th scope="col">{t('available_col')}</th>
                <th scope="col">{t('longest_wait')}</th>
                <th scope="col">{t('sla')}</th>
                <th scope="col">{t('queued_col')}</th>
              </tr>
            </thead>
            <tbody>
              {floor.queues.map((q) => {
                const sla = slaPercent(q);
                const wait = longestWaitNow(q, floor, now);
                return (
                  <tr key={q.group} data-testid="queue-row" data-group={q.group}>
                    <th scope="row">
                      {q.name}
                      {q.hours && <HoursBadge hours={q.hours} floor={floor} now={now} />}
                    </th>
                    <td data-testid="queue-waiting" class={q.waiting ? 'hot' : ''}>
                      {q.waiting}
                    </td>
                    <td data-testid="queue-offered">{q.offered}</td>
                    <td data-testid="queue-available" class={q.available === 0 && q.waiting ? 'hot' : ''}>
                      {q.available == null ? '—' : q.available}
                    </td>
                    <td class={q.sla_ms != null && wait > q.sla_ms ? 'late' : ''}>{wait ? formatDuration(wait) : '—'}</td>
                    <td>{sla == null ? '—' : sla + '%' + (q.sla_ms ? ' / ' + formatDuration(q.sla_ms) : '')}</td>
                    <td>
                      <QueuedList q={q} floor={floor} now={now} open={open} onOpen={setOpen} />
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        )}
      </section>
      <EmergencyPanel active={floor?.emergencies ?? null} queues={floor?.queues ?? []} />
      <KpiPanel signature={sum ? [sum.waiting, sum.offered, sum.load, sum.online].join('/') : ''} />
      <DeadLetters onOpen={setOpen} />
      <section class="panel" aria-labelledby="ops-h">
        <h2 id="ops-h" class="panel-title">
          {t('operators')}
        </h2>
        {floor && !floor.operators.length && <Empty>{t('none')}</Empty>}
        {floor && (
          <table class="table" data-testid="operators-table">
            <thead>
              <tr>
                <th scope="col">{t('operator')}</th>
                <th scope="col">{t('presence')}</th>
                <th scope="col">{t('load')}</th>
                <th scope="col">{t('conversations')}</th>
              </tr>
            </thead>
            <tbody>
              {floor.operators.map((o) => (
                <tr key={o.id} data-testid="operator-row" data-operator={o.id}>
                  <th scope="row">{o.name}</th>
                  <td data-testid="operator-presence" data-presence={o.presence}>
                    <span class={'dot dot-' + o.presence} aria-hidden="true" /> {t(('presence_' + o.presence) as any)}
                    {o.presence_since ? <span class="muted small"> · {formatDuration(sinceNow(o.presence_since, floor, now))}</span> : null}
                    {o.wrap_up_until != null && o.wrap_up_until - floor.at + floor.receivedAt > now && (
                      <span class="muted small" data-testid="operator-wrap-up">
                        {' '}
                        · {t('wrap_up_short', { time: formatDuration(o.wrap_up_until - floor.at + floor.receivedAt - now) })}
                      </span>
                    )}
                    {o.presence_reason && (
                      <span class="muted small" data-testid="operator-presence-reason" data-reason={o.presence_reason}>
                        {' '}
                        · {o.presence_reason === 'disconnected' ? t('reason_disconnected') : o.presence_reason}
                      </span>
                    )}
                  </td>
                  <td>
                    <meter min={0} max={o.capacity} value={o.load} aria-label={t('load_of', { name: o.name })} /> {o.load}/{o.capacity}
                  </td>
                  <td>
                    {o.active
                      ? o.active.map((id) => (
                          <button key={id} type="button" class="link" onClick={() => setOpen(id)}>
                            #{id}
                          </button>
                        ))
                      : o.activeCount}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </section>
      <section class="panel inspector-panel" aria-labelledby="insp-h">
        <div class="row">
          <h2 id="insp-h" class="panel-title grow">
            {t('conversation')}
          </h2>
          {open != null && (
            <button type="button" class="ghost" data-testid="inspector-close" onClick={() => setOpen(null)}>
              {t('close_inspector')}
            </button>
          )}
        </div>
        <form
          class="row"
          onSubmit={(e) => {
            e.preventDefault();
            const id = Number(lookup.replace(/^#/, ''));
            if (Number.isInteger(id) && id >= 0) setOpen(id);
          }}
        >
          <label class="sr-only" for="lookup">
            {t('open_conversation_id')}
          </label>
          <input id="lookup" data-testid="lookup-input" inputMode="numeric" placeholder={t('open_conversation_id')} value={lookup} onInput={(e) => setLookup((e.currentTarget as HTMLInputElement).value)} />
          <button type="submit">{t('open')}</button>
        </form>
        {open != null ? (
          // Over the socket the floor announces each change of the open conversation;
          // only while it is down does the inspector poll.
          <Inspector key={open} id={open} canReassign={true} canNote={true} live={mode !== 'socket' || !linkOpen} pushed={pushed} place={floorPlace(floor, open)} operators={floor?.operators} />
        ) : (
          <Empty>{t('inspector_hint')}</Empty>
        )}
      </section>
    </div>
  );
}

/** The conversations waiting in one queue, head first; each opens the inspector. */
function QueuedList(props: { q: QueueRow; floor: Floor; now: number; open: number | null; onOpen: (id: number) => void }) {
  const { t } = useApp();
  const { q } = props;
  if (!q.conversations.length) return <>—</>;
  const more = q.waiting + q.offered - q.conversations.length;
  return (
    <ul class="queued" aria-label={t('queued_col') + ': ' + q.name}>
      {q.conversations.map((c) => {
        const wait = formatDuration(queuedWaitNow(c, props.floor, props.now));
        // The visible text is the accessible name (visitor and wait), plus the state.
        const visitor = c.visitor || t('visitor');
        return (
          <li key={c.conversation}>
            <button
              type="button"
              class={'queued-btn' + (c.state === 'offered' ? ' offered' : '') + (props.open === c.conversation ? ' current' : '')}
              data-testid="queued-conv"
              data-conv={c.conversation}
              data-state={c.state}
              aria-current={props.open === c.conversation ? 'true' : undefined}
              onClick={() => props.onOpen(c.conversation)}
            >
              #{c.conversation} {visitor} <span class="muted small">{wait}</span>
              {c.priority > 0 && (
                <span class="prio" data-testid="queued-priority" title={t('priority')}>
                  P{c.priority}
                </span>
              )}
              {c.step != null && (
                <span class="step-chip" data-testid="queued-step" data-step={c.step}>
                  {t('step_short', { n: c.step })}
                  {c.next_step_at != null && (
                    <span class="muted" data-testid="queued-next-step">
                      {' '}
                      · {t('next_step_in', { time: formatDuration(untilNow(c.next_step_at, props.floor, props.now)) })}
                    </span>
                  )}
                </span>
              )}
              {c.state === 'offered' && <span class="sr-only">, {t('queued_offered')}</span>}
            </button>
            {c.state === 'waiting' && c.why && c.why !== 'routing' && (
              <span class="muted small why" data-testid="queued-why" data-why={c.why}>
                {c.why === 'everyone_passed' && c.next_round_at
                  ? t('why_everyone_passed_at', { time: new Date(c.next_round_at - props.floor.at + props.floor.receivedAt).toLocaleTimeString() })
                  : t(('why_' + c.why) as any)}
              </span>
            )}
          </li>
        );
      })}
      {more > 0 && <li class="muted small">{t('queued_more', { n: more })}</li>}
    </ul>
  );
}

/** A group's working hours on the floor: "open", or "closed until 09:00". */
function HoursBadge(props: { hours: NonNullable<QueueRow['hours']>; floor: Floor; now: number }) {
  const { t, lang } = useApp();
  const { open, next_change_at } = props.hours;
  // The moment by this browser's clock (the snapshot's skew removed).
  const until = next_change_at != null ? props.now + untilNow(next_change_at, props.floor, props.now) : null;
  return (
    <span class={'hours-badge ' + (open ? 'is-open' : 'is-closed')} data-testid="queue-hours" data-open={String(open)}>
      {open ? t('queue_open') : until != null ? t('queue_closed_until', { time: formatWhen(until, lang, props.now) }) : t('queue_closed')}
    </span>
  );
}

/** Local midnight today, in ms: "today" as the supervisor's clock has it. */
export function localMidnight(now: number): number {
  const d = new Date(now);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

/** How often today's KPIs are read again while nothing on the floor moves. */
const KPI_REFRESH_MS = 15000;
/** The least time between two reads when the floor keeps moving. */
const KPI_MIN_GAP_MS = 3000;

/**
 * Today's figures per group: handled, abandoned, average wait, service level, AHT, CSAT.
 * Read at once, every KPI_REFRESH_MS, and when `signature` (what the floor shows:
 * queued, offered, held, online) changes, at most once every KPI_MIN_GAP_MS: the
 * figures move with answers, closes and ratings, which move the floor.
 */
function KpiPanel(props: { signature: string }) {
  const { t, api } = useApp();
  const [groups, setGroups] = useState<GroupKpis[] | null>(null);
  const [pauses, setPauses] = useState<PauseRow[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const lastRead = useRef(0);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    const every = setInterval(() => setTick((n) => n + 1), KPI_REFRESH_MS);
    return () => clearInterval(every);
  }, []);
  useEffect(() => {
    const wait = lastRead.current + KPI_MIN_GAP_MS - Date.now();
    if (wait > 0) {
      // Too soon after the last read: read once the gap has passed.
      const later = setTimeout(() => setTick((n) => n + 1), wait);
      return () => clearTimeout(later);
    }
    let live = true;
    lastRead.current = Date.now();
    const since = localMidnight(Date.now());
    api
      .get<{ groups: GroupKpis[] }>('/api/kpis?since=' + since)
      .then((r) => live && (setGroups(r.groups ?? []), setError(null)))
      .catch((e) => live && setError(describeError(t, e.code, e.message)));
    api
      .get<{ operators: PauseRow[] }>('/api/pauses?since=' + since)
      .then((r) => live && setPauses((r.operators ?? []).filter((o) => Object.keys(o.reasons ?? {}).length)))
      .catch(() => {});
    return () => {
      live = false;
    };
  }, [props.signature, tick]);
  const ms = (v: number | null) => (v == null ? '—' : formatDuration(v));
  return (
    <section class="panel kpis" aria-labelledby="kpi-h">
      <h2 id="kpi-h" class="panel-title">
        {t('kpis_today')}
      </h2>
      {error && <p class="error small">{error}</p>}
      {!groups ? (
        <p class="muted">{t('loading')}</p>
      ) : (
        <table class="table" data-testid="kpi-table">
          <thead>
            <tr>
              <th scope="col">{t('group')}</th>
              <th scope="col">{t('kpi_entered')}</th>
              <th scope="col">{t('kpi_handled')}</th>
              <th scope="col">{t('kpi_abandoned')}</th>
              <th scope="col">{t('kpi_avg_wait')}</th>
              <th scope="col">{t('kpi_service_level')}</th>
              <th scope="col">{t('kpi_aht')}</th>
              <th scope="col">{t('kpi_csat')}</th>
            </tr>
          </thead>
          <tbody>
            {groups.map((g) => (
              <tr key={g.group} data-testid="kpi-row" data-group={g.group}>
                <th scope="row">{g.name}</th>
                <td>{g.entered}</td>
                <td data-testid="kpi-handled">{g.handled}</td>
                <td data-testid="kpi-abandoned">{g.abandoned}</td>
                <td>{ms(g.avg_wait_ms)}</td>
                <td data-testid="kpi-sl">{g.service_level == null ? '—' : g.service_level + '%'}</td>
                <td>{ms(g.avg_handle_ms)}</td>
                <td data-testid="kpi-csat">{g.csat == null ? '—' : g.csat.toFixed(1) + (g.rated ? ' (' + g.rated + ')' : '')}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {pauses && pauses.length > 0 && (
        <>
          <h3 class="small">{t('breaks_today')}</h3>
          <table class="table small" data-testid="pause-table">
            <tbody>
              {pauses.map((p) => (
                <tr key={p.operator} data-testid="pause-row" data-operator={p.operator}>
                  <th scope="row">{p.name}</th>
                  <td>
                    {Object.entries(p.reasons)
                      .map(([reason, ms]) => reason + ' ' + formatDuration(ms))
                      .join(' · ')}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
    </section>
  );
}

/** One operator's time on break per reason today (`GET /api/pauses`). */
interface PauseRow {
  operator: string;
  name: string;
  reasons: Record<string, number>;
  current: { reason: string; since: number } | null;
}

/**
 * Emergency notices: what new customers of a channel or group are told at once (an
 * outage), switched on with a message and off in one action; both are audited.
 */
function EmergencyPanel(props: { active: EmergencyRow[] | null; queues: QueueRow[] }) {
  const { t, api, notify, lang } = useApp();
  const [channels, setChannels] = useState<{ id: string; name: string }[]>([]);
  const [target, setTarget] = useState('');
  const [message, setMessage] = useState('');
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    api.get<{ channels: { id: string; name: string }[] }>('/api/channels').then((r) => setChannels(r.channels ?? [])).catch(() => {});
  }, []);
  const put = async (body: Record<string, unknown>) => {
    try {
      await api.put('/api/emergencies', body);
      setError(null);
      return true;
    } catch (e: any) {
      setError(describeError(t, e.code, e.message));
      return false;
    }
  };
  const label = (e: EmergencyRow) => (e.channel ? t('channel') + ' ' + (channels.find((c) => c.id === e.channel)?.name ?? e.channel) : t('group') + ' ' + (props.queues.find((q) => q.group === e.group)?.name ?? e.group));
  return (
    <section class="panel emergencies" aria-labelledby="emg-h" data-testid="emergency-panel">
      <h2 id="emg-h" class="panel-title">
        {t('emergency_notices')}
      </h2>
      {props.active?.map((e) => (
        <div key={(e.channel ?? '') + '/' + (e.group ?? '')} class="banner emergency" role="status" data-testid="emergency-active" data-channel={e.channel} data-group={e.group}>
          <p>
            <strong>{label(e)}:</strong> {e.message}{' '}
            <span class="muted small">{t('emergency_by', { by: e.by, at: new Date(e.since).toLocaleTimeString(lang) })}</span>
          </p>
          <button type="button" class="danger small-btn" data-testid="emergency-off" onClick={() => put(e.channel ? { channel: e.channel, message: null } : { group: e.group, message: null }).then((ok) => ok && notify(t('emergency_switched_off'), 'info'))}>
            {t('switch_off')}
          </button>
        </div>
      ))}
      <form
        class="row wrap"
        data-testid="emergency-form"
        onSubmit={async (e) => {
          e.preventDefault();
          if (!target || !message.trim()) return setError(t('err_emergency_form'));
          const [kind, id] = target.split(':');
          if (await put({ [kind]: id, message: message.trim() })) setMessage('');
        }}
      >
        <label class="sr-only" for="emg-target">
          {t('emergency_target')}
        </label>
        <select id="emg-target" data-testid="emergency-target" value={target} onChange={(e) => setTarget((e.currentTarget as HTMLSelectElement).value)}>
          <option value="">{t('emergency_target')}</option>
          {channels.map((c) => (
            <option key={'c' + c.id} value={'channel:' + c.id}>
              {t('channel')}: {c.name}
            </option>
          ))}
          {props.queues.map((q) => (
            <option key={'g' + q.group} value={'group:' + q.group}>
              {t('group')}: {q.name}
            </option>
          ))}
        </select>
        <label class="sr-only" for="emg-message">
          {t('emergency_message')}
        </label>
        <input id="emg-message" class="grow" data-testid="emergency-message" maxLength={4000} placeholder={t('emergency_message')} value={message} onInput={(e) => setMessage((e.currentTarget as HTMLInputElement).value)} />
        <button type="submit" class="danger" data-testid="emergency-on">
          {t('switch_on')}
        </button>
      </form>
      {error && <p class="error small">{error}</p>}
    </section>
  );
}

/** How often the failed deliveries are read again while the floor is on screen. */
export const DEAD_LETTERS_POLL_MS = 30000;
/** Pages of 1000 failed deliveries read at most, and rows shown (the newest). */
const DEAD_LETTER_PAGES = 10;
const DEAD_LETTERS_SHOWN = 200;

/**
 * Failed deliveries: messages to messenger customers that were refused for good, ran out
 * of attempts, or may or may not have arrived (`unknown`). Each can be sent again; each
 * conversation opens in the inspector.
 */
function DeadLetters(props: { onOpen: (id: number) => void }) {
  const { t, api, lang, notify } = useApp();
  const [list, setList] = useState<Delivery[] | null>(null);
  const [more, setMore] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState<string | null>(null);
  // Every page (oldest conversation first), so that old letters that cannot be sent
  // again do not hide newer ones; shown newest first.
  const readAll = async () => {
    const all: Delivery[] = [];
    let after: string | null = null;
    for (let page = 0; page < DEAD_LETTER_PAGES; page++) {
      const r: { deliveries: Delivery[]; next?: string | null } = await api.get('/api/deliveries?limit=1000' + (after ? '&after=' + encodeURIComponent(after) : ''));
      all.push(...(r.deliveries ?? []));
      after = r.next ?? null;
      if (!after) break;
    }
    return { all: all.reverse(), more: after != null };
  };
  const poller = usePoller(
    (running) =>
      readAll().then(
        (r) => running() && (setList(r.all), setMore(r.more), setError(null)),
        (e) => running() && setError(describeError(t, e.code, e.message)),
      ),
    DEAD_LETTERS_POLL_MS,
    [],
  );
  const retry = async (d: Delivery) => {
    const key = d.conversation + '/' + d.seq;
    setBusy(key);
    try {
      await api.post('/api/deliveries/' + d.conversation + '/' + d.seq + '/retry', undefined);
      notify(t('sent_again'), 'info');
      setError(null);
    } catch (e: any) {
      // Sent again from elsewhere meanwhile, say: the server says why.
      setError(refusal(t, e));
    } finally {
      setBusy(null);
      poller.kick();
    }
  };
  return (
    <section class="panel dead-letters" aria-labelledby="dead-h" data-testid="dead-letters">
      <h2 id="dead-h" class="panel-title">
        {t('dead_letters')} {list?.length ? <span class="badge">{list.length + (more ? '+' : '')}</span> : null}
      </h2>
      {error && (
        <p class="error small" role="alert">
          {error}
        </p>
      )}
      {!list ? (
        !error && <p class="muted">{t('loading')}</p>
      ) : !list.length ? (
        <Empty>{t('dead_letters_none')}</Empty>
      ) : (
        <table class="table small" data-testid="dead-letters-table">
          <thead>
            <tr>
              <th scope="col">{t('conversation')}</th>
              <th scope="col">{t('channel')}</th>
              <th scope="col">{t('recipient')}</th>
              <th scope="col">{t('status')}</th>
              <th scope="col">{t('reason')}</th>
              <th scope="col">{t('attempts')}</th>
              <th scope="col">{t('updated')}</th>
              <th scope="col">
                <span class="sr-only">{t('send_again')}</span>
              </th>
            </tr>
          </thead>
          <tbody>
            {list.slice(0, DEAD_LETTERS_SHOWN).map((d) => (
              <tr key={d.conversation + '/' + d.seq} data-testid="dead-letter" data-conv={d.conversation} data-seq={d.seq} data-status={d.status}>
                <th scope="row">
                  <button type="button" class="link" onClick={() => props.onOpen(d.conversation)}>
                    #{d.conversation}
                  </button>
                </th>
                <td>{d.channel}</td>
                <td>{d.recipient}</td>
                <td>{d.status === 'unknown' ? t('dead_unknown') : d.status === 'failed' ? t('dead_failed') : d.status}</td>
                <td data-testid="dead-letter-reason">{d.reason || '—'}</td>
                <td>{d.attempts}</td>
                <td>{formatWhen(d.updated_at, lang)}</td>
                <td>
                  <button
                    type="button"
                    class="small-btn"
                    data-testid="dead-letter-retry"
                    aria-label={t('send_again_x', { id: d.conversation, seq: d.seq })}
                    disabled={busy === d.conversation + '/' + d.seq}
                    onClick={() => retry(d)}
                  >
                    {t('send_again')}
                  </button>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
