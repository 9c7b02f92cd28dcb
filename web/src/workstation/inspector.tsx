/** Read-only view of any conversation, its routing decisions, and (supervisors) reassignment. */
import { uid } from '../shared/ids';
import { useEffect, useRef, useState } from 'preact/hooks';
import { formatDateTime } from '../shared/format';
import type { ConversationDoc, DecisionRecord, OperatorStatus, SkillGroup } from './types';
import { EntryView, operatorNames } from './entries';
import { describeError, exclusionText, stateText } from './strings';
import { Empty, ErrorText, Field, GroupOptions, useApp, usePoller } from './ui';

/** How often an open inspector re-reads its conversation (messages do not reach the floor). */
export const INSPECTOR_POLL_MS = 2000;

/**
 * `live`: keep the view current while it is open — re-read every INSPECTOR_POLL_MS (only
 * while the tab is visible, one request at a time) and at once when `place` changes (the
 * floor moved the conversation: offered, taken, reassigned, closed). Without `live` it is
 * read once, with a manual Refresh.
 */
export function Inspector(props: {
  id: number;
  canReassign: boolean;
  /** Show the internal-note form (staff who may read it may add one). */
  canNote?: boolean;
  live?: boolean;
  /** The conversation's newest seq as a socket announced it: re-read when it moves. */
  pushed?: number;
  /** Operators as the live floor shows them (presence, load), for the reassign form. */
  operators?: ReassignOperator[];
  place?: string;
}) {
  const { t, api, lang } = useApp();
  const [doc, setDoc] = useState<ConversationDoc | null>(null);
  const [error, setError] = useState<string | null>(null);
  // Bumped on every change the floor reports and on Refresh: the decisions re-read on it.
  const [version, setVersion] = useState(0);
  const poller = usePoller(
    (running) =>
      api.get<ConversationDoc>('/api/conversations/' + props.id).then(
        (d) => {
          if (!running()) return; // closed meanwhile
          setDoc(d);
          setError(null);
        },
        (e) => {
          if (running()) setError(describeError(t, e.code, e.message));
        },
      ),
    props.live ? INSPECTOR_POLL_MS : 0,
    [props.id, props.live],
  );
  const refresh = () => {
    poller.kick();
    setVersion((v) => v + 1);
  };
  const first = useRef(true);
  useEffect(() => {
    if (first.current) {
      first.current = false;
      return;
    }
    refresh();
  }, [props.place]);
  // Announced over the socket: re-read unless what is shown is already that new.
  useEffect(() => {
    if (props.pushed != null && doc && props.pushed > doc.last_seq) refresh();
  }, [props.pushed]);
  if (!doc) return error ? <ErrorText error={error} /> : <p class="muted">{t('loading')}</p>;
  const names = operatorNames(doc.history);
  return (
    <div class="inspector" data-testid="inspector" data-conv={doc.conversation} data-last-seq={doc.last_seq}>
      <div class="row">
        <h3 class="grow">
          {doc.visitor.name || t('visitor')} <span class="muted">#{doc.conversation}</span>
        </h3>
        {(props.live || props.pushed != null) && (
          <span class="muted small" data-testid="inspector-live" data-source={props.pushed != null && !props.live ? 'socket' : 'poll'}>
            {t('inspector_live')}
          </span>
        )}
        <button type="button" class="ghost" data-testid="inspector-refresh" onClick={refresh}>
          {t('refresh')}
        </button>
      </div>
      {error && <p class="error small">{t('inspector_stale', { error })}</p>}
      <dl class="kv">
        <dt>{t('state')}</dt>
        <dd data-testid="inspector-state">
          {stateText(t, doc.status.state)}
          {doc.status.operator ? ' · ' + doc.status.operator : ''}
        </dd>
        <dt>{t('channel')}</dt>
        <dd>{doc.channel}</dd>
        <dt>{t('group')}</dt>
        <dd>{doc.group}</dd>
        <dt>{t('started_at')}</dt>
        <dd>{formatDateTime(doc.created_at, lang)}</dd>
        {Object.entries(doc.visitor.attributes ?? {}).map(([k, v]) => [<dt key={'k' + k}>{k}</dt>, <dd key={'v' + k}>{v}</dd>])}
      </dl>
      <h4>{t('history')}</h4>
      <ol class="log log-static" aria-label={t('history')} data-testid="inspector-log">
        {doc.history.map((e) => (
          <EntryView key={e.seq} e={e} visitor={doc.visitor.name} names={names} />
        ))}
      </ol>
      {props.canNote && <NoteForm id={doc.conversation} onDone={refresh} />}
      {props.canReassign && doc.visitor.id && <BlockCustomer visitor={doc.visitor.id} />}
      <Decisions id={doc.conversation} version={version} />
      {props.canReassign && doc.status.state !== 'closed' && <Reassign id={doc.conversation} live={props.operators} onDone={refresh} />}
    </div>
  );
}

function Decisions(props: { id: number; version: number }) {
  const { t, api, lang } = useApp();
  const [list, setList] = useState<DecisionRecord[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let live = true;
    api
      .get<{ decisions: DecisionRecord[] }>('/api/conversations/' + props.id + '/decisions')
      .then((r) => live && (setList(r.decisions ?? []), setError(null)))
      .catch((e) => live && setError(describeError(t, e.code, e.message)));
    return () => {
      live = false;
    };
  }, [props.id, props.version]);
  return (
    <section data-testid="decisions" aria-labelledby={'dec-' + props.id}>
      <h4 id={'dec-' + props.id}>{t('why_this_operator')}</h4>
      <ErrorText error={error} />
      {list && !list.length && <Empty>{t('no_decisions')}</Empty>}
      {list?.map((d) => (
        <div key={d.offer} class="decision" data-testid="decision">
          <p class="small">
            {t('decision_line', { at: formatDateTime(d.at, lang), group: d.group, policy: t(('policy_' + d.policy) as any), chosen: d.chosen })}{' '}
            <span class="muted">v{d.policy_version}</span>
            {d.step != null && (
              <span class="muted" data-testid="decision-step" data-step={d.step}>
                {' '}
                · {t('step_short', { n: d.step })}
              </span>
            )}
          </p>
          <table class="table small">
            <thead>
              <tr>
                <th scope="col">{t('operator')}</th>
                <th scope="col">{t('load')}</th>
                <th scope="col">{t('score')}</th>
                <th scope="col">{t('excluded')}</th>
              </tr>
            </thead>
            <tbody>
              {[...d.candidates]
                .sort((a, b) => (b.score ?? -Infinity) - (a.score ?? -Infinity))
                .map((c) => (
                  <tr key={c.operator} class={c.operator === d.chosen ? 'chosen' : c.excluded ? 'excluded' : ''}>
                    <td>
                      {c.operator}
                      {c.operator === d.chosen && <strong> ✓ {t('chosen')}</strong>}
                    </td>
                    <td>
                      {c.load}/{c.capacity}
                    </td>
                    <td>{c.score ?? '—'}</td>
                    <td>{c.excluded ? exclusionText(t, c.excluded) : ''}</td>
                  </tr>
                ))}
            </tbody>
          </table>
        </div>
      ))}
    </section>
  );
}

/** What the reassign form needs of an operator. */
export type ReassignOperator = Pick<OperatorStatus, 'id' | 'name' | 'presence' | 'load' | 'capacity'>;

function Reassign(props: { id: number; live?: ReassignOperator[]; onDone: () => void }) {
  const { t, api, notify } = useApp();
  const [mode, setMode] = useState<'operator' | 'group'>('operator');
  const [fetched, setOperators] = useState<ReassignOperator[]>([]);
  // The floor's live list when there is one: who is online changes while the form is open.
  const operators = props.live ?? fetched;
  const [groups, setGroups] = useState<SkillGroup[]>([]);
  const [target, setTarget] = useState('');
  const [comment, setComment] = useState('');
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    if (!props.live) api.get<{ operators: OperatorStatus[] }>('/api/operators').then((r) => setOperators(r.operators)).catch(() => {});
    api.get<{ skill_groups: SkillGroup[] }>('/api/skill-groups').then((r) => setGroups(r.skill_groups)).catch(() => {});
  }, []);
  return (
    <form
      class="stack reassign"
      data-testid="reassign-form"
      onSubmit={async (e) => {
        e.preventDefault();
        if (!target) return setError(t('err_pick_target'));
        try {
          const body: Record<string, string> = mode === 'operator' ? { operator: target } : { group: target };
          if (comment.trim()) body.comment = comment.trim();
          await api.post('/api/conversations/' + props.id + '/reassign', body);
          notify(t('reassigned'), 'info');
          // Ready for the next one: the form starts over.
          setTarget('');
          setComment('');
          setMode('operator');
          setError(null);
          if (!props.live) api.get<{ operators: OperatorStatus[] }>('/api/operators').then((r) => setOperators(r.operators)).catch(() => {});
          props.onDone();
        } catch (err: any) {
          setError(describeError(t, err.code, err.message));
        }
      }}
    >
      <h4>{t('reassign')}</h4>
      <fieldset class="seg">
        <legend class="sr-only">{t('transfer_to')}</legend>
        <label>
          <input type="radio" name={'rm' + props.id} checked={mode === 'operator'} onChange={() => (setMode('operator'), setTarget(''))} /> {t('to_operator')}
        </label>
        <label>
          <input type="radio" name={'rm' + props.id} checked={mode === 'group'} onChange={() => (setMode('group'), setTarget(''))} /> {t('to_group')}
        </label>
      </fieldset>
      <Field label={mode === 'operator' ? t('operator') : t('group')}>
        <select value={target} data-testid="reassign-target" onChange={(e) => setTarget((e.currentTarget as HTMLSelectElement).value)}>
          <option value="">—</option>
          {mode === 'operator'
            ? operators.map((o) => (
                <option key={o.id} value={o.id} disabled={o.presence === 'offline'}>
                  {o.name} — {t(('presence_' + o.presence) as any)}, {o.load}/{o.capacity}
                </option>
              ))
            : <GroupOptions groups={groups} />}
        </select>
      </Field>
      <Field label={t('comment')}>
        <input value={comment} maxLength={4000} onInput={(e) => setComment((e.currentTarget as HTMLInputElement).value)} />
      </Field>
      <ErrorText error={error} />
      <button type="submit" class="primary" data-testid="reassign-submit">
        {t('reassign')}
      </button>
    </form>
  );
}

/** Adds an internal note (staff only) to the conversation. */
function NoteForm(props: { id: number; onDone: () => void }) {
  const { t, api } = useApp();
  const [text, setText] = useState('');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  return (
    <form
      class="stack note-form"
      data-testid="note-form"
      onSubmit={async (e) => {
        e.preventDefault();
        if (!text.trim() || busy) return;
        setBusy(true);
        try {
          const key = 'note-' + uid();
          await api.post('/api/conversations/' + props.id + '/notes', { text: text.trim(), key });
          setText('');
          setError(null);
          props.onDone();
        } catch (err: any) {
          setError(describeError(t, err.code, err.message));
        } finally {
          setBusy(false);
        }
      }}
    >
      <Field label={t('note_mode')}>
        <textarea rows={2} maxLength={4000} data-testid="note-input" placeholder={t('note_placeholder')} value={text} onInput={(e) => setText((e.currentTarget as HTMLTextAreaElement).value)} />
      </Field>
      <ErrorText error={error} />
      <button type="submit" data-testid="note-submit" disabled={busy || !text.trim()}>
        {t('add_note')}
      </button>
    </form>
  );
}

/** Blocks the conversation's (verified) visitor on every channel, with a note. */
function BlockCustomer(props: { visitor: string }) {
  const { t, api, notify } = useApp();
  const [error, setError] = useState<string | null>(null);
  return (
    <div class="row block-customer">
      <button
        type="button"
        class="danger small-btn"
        data-testid="block-customer"
        onClick={async () => {
          const note = window.prompt(t('access_note'));
          // Cancelled: nothing is blocked.
          if (note === null) return;
          try {
            await api.put('/api/access/rules', { list: 'block', kind: 'visitor', value: props.visitor, note });
            notify(t('customer_blocked'), 'info');
            setError(null);
          } catch (e: any) {
            setError(describeError(t, e.code, e.message));
          }
        }}
      >
        {t('block_customer')}
      </button>
      <ErrorText error={error} />
    </div>
  );
}
