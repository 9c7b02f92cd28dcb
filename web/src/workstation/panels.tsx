/** Side panels and dialogs of the desk: client card, templates, transfer, close. */
import { useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { formatDateTime } from '../shared/format';
import type { Conv } from './operator-state';
import type { OperatorSession } from './operator-session';
import { byScope, fillPlaceholders, searchTemplates, templateId, validateTemplate, type PlaceholderValues, type TemplateScope } from './templates';
import type { ConversationDoc, MyConversation, OperatorStatus, SkillGroup, Template } from './types';
import { parseTags, tagsProblem, MAX_TAGS } from './forms';
import { describeError, stateText } from './strings';
import { Dialog, Empty, ErrorText, Field, GroupOptions, useApp } from './ui';
import { Inspector } from './inspector';

/** `doc`: the conversation as REST shows it (read by the pane once it is opened). */
export function ClientCard(props: { conv: Conv; doc: ConversationDoc | null; docError: string | null }) {
  const { t, api, lang } = useApp();
  const { conv, doc } = props;
  const [error, setError] = useState<string | null>(null);
  const [open, setOpen] = useState<number | null>(null);
  const attrs = Object.entries(Object.keys(conv.attributes).length ? conv.attributes : doc?.visitor.attributes ?? {});
  // A search over this customer's earlier conversations (their text and notes).
  const [query, setQuery] = useState('');
  const [found, setFound] = useState<MyConversation[] | null>(null);
  // Replies that come back after the card moved on (another conversation, another
  // search) are dropped.
  const asked = useRef('');
  const search = (q: string) => {
    if (!q.trim()) return setFound(null);
    const tag = conv.id + ' ' + q.trim();
    asked.current = tag;
    api
      .get<{ conversations: MyConversation[] }>('/api/conversations/' + conv.id + '/earlier?q=' + encodeURIComponent(q.trim()))
      .then((r) => asked.current === tag && setFound(r.conversations ?? []))
      .catch((e) => asked.current === tag && setError(describeError(t, e.code, e.message)));
  };
  useEffect(() => {
    setQuery('');
    setFound(null);
    setError(null);
    asked.current = '';
  }, [conv.id]);
  const earlier = found
    ? found.map((f) => ({ conversation: f.conversation, created_at: f.created_at, state: f.state, preview: f.preview?.text }))
    : (doc?.earlier ?? []).map((e) => ({ ...e, preview: undefined as string | undefined }));
  return (
    <section class="card" data-testid="client-card" aria-label={t('client_card')}>
      <h3>{conv.visitor || doc?.visitor.name || t('visitor')}</h3>
      <dl class="kv">
        <dt>{t('conversation')}</dt>
        <dd>#{conv.id}</dd>
        <dt>{t('channel')}</dt>
        <dd>{conv.channel || doc?.channel || '—'}</dd>
        <dt>{t('group')}</dt>
        <dd>{conv.group || doc?.group || '—'}</dd>
        {doc && (
          <>
            <dt>{t('started_at')}</dt>
            <dd>{formatDateTime(doc.created_at, lang)}</dd>
          </>
        )}
        {attrs.map(([k, v]) => [<dt key={'k' + k}>{k}</dt>, <dd key={'v' + k}>{v}</dd>])}
      </dl>
      <h4>{t('earlier_conversations')}</h4>
      <ErrorText error={error ?? props.docError} />
      {doc && (doc.earlier?.length ?? 0) > 0 && (
        <form
          class="row"
          role="search"
          onSubmit={(e) => {
            e.preventDefault();
            search(query);
          }}
        >
          <label class="sr-only" for={'earlier-q-' + conv.id}>
            {t('search_earlier')}
          </label>
          <input
            id={'earlier-q-' + conv.id}
            type="search"
            class="grow"
            data-testid="earlier-search"
            maxLength={200}
            placeholder={t('search_earlier')}
            value={query}
            onInput={(e) => {
              const v = (e.currentTarget as HTMLInputElement).value;
              setQuery(v);
              if (!v.trim()) setFound(null);
            }}
          />
          <button type="submit">{t('search')}</button>
        </form>
      )}
      {found && !found.length && <Empty>{t('no_results')}</Empty>}
      {doc && !found && !earlier.length && <Empty>{doc.earlier ? t('none') : t('earlier_unavailable')}</Empty>}
      <ul class="plain" data-testid="earlier-list">
        {earlier.map((e) => (
          <li key={e.conversation}>
            <button type="button" class="link" onClick={() => setOpen(e.conversation)}>
              #{e.conversation}
            </button>{' '}
            <span class="muted small">
              {formatDateTime(e.created_at, lang)} · {stateText(t, e.state)}
            </span>
            {e.preview && <span class="conv-preview block" data-testid="earlier-preview">{e.preview}</span>}
          </li>
        ))}
      </ul>
      {open != null && (
        <Dialog title={t('conversation_n', { id: open })} onClose={() => setOpen(null)}>
          <Inspector id={open} canReassign={false} canNote={false} />
        </Dialog>
      )}
    </section>
  );
}

export function TemplatesPanel(props: { values: PlaceholderValues | null; onInsert?: (text: string) => void; draft?: string; canEditShared: boolean }) {
  const { t, api, notify } = useApp();
  const [all, setAll] = useState<Template[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [query, setQuery] = useState('');
  const [scope, setScope] = useState<TemplateScope>('all');
  const [creating, setCreating] = useState(false);
  const [editing, setEditing] = useState<Template | null>(null);
  const load = () =>
    api
      .get<{ templates: Template[] }>('/api/templates')
      .then((r) => {
        setAll(r.templates ?? []);
        setError(null);
      })
      .catch((e) => setError(describeError(t, e.code, e.message)));
  useEffect(() => {
    load();
  }, []);
  const shown = useMemo(() => searchTemplates(byScope(all ?? [], scope), query), [all, scope, query]);
  const toggleFav = async (tpl: Template) => {
    try {
      await api.put('/api/templates/' + encodeURIComponent(tpl.id) + '/favourite', { favourite: !tpl.favourite });
      setAll((xs) => (xs ?? []).map((x) => (x.id === tpl.id ? { ...x, favourite: !x.favourite } : x)));
    } catch (e: any) {
      notify(describeError(t, e.code, e.message), 'error');
    }
  };
  return (
    <section class="templates" data-testid="templates-panel" aria-label={t('templates')}>
      <div class="row">
        <label class="sr-only" for="tpl-search">
          {t('search_templates')}
        </label>
        <input id="tpl-search" type="search" class="grow" data-testid="template-search" placeholder={t('search_templates')} value={query} onInput={(e) => setQuery((e.currentTarget as HTMLInputElement).value)} />
        <label class="sr-only" for="tpl-scope">
          {t('show')}
        </label>
        <select id="tpl-scope" value={scope} onChange={(e) => setScope((e.currentTarget as HTMLSelectElement).value as TemplateScope)}>
          <option value="all">{t('scope_all')}</option>
          <option value="favourites">{t('scope_favourites')}</option>
          <option value="shared">{t('scope_shared')}</option>
          <option value="personal">{t('scope_personal')}</option>
        </select>
      </div>
      <ErrorText error={error} />
      {all && !shown.length && <Empty>{t('no_templates')}</Empty>}
      <ul class="tpl-list">
        {shown.map((tpl) => {
          // A placeholder without a value stays visible: the composer flags it rather than
          // sending "Hello , …".
          const text = props.values ? fillPlaceholders(tpl.text, props.values, null) : tpl.text;
          return (
            <li key={tpl.id} class="tpl" data-testid="template">
              <div class="row">
                <strong class="grow">{tpl.title}</strong>
                <span class="muted small">{tpl.group ? tpl.group : t('personal')}</span>
                {props.onInsert && (
                  <button type="button" class="ghost star" aria-pressed={tpl.favourite} aria-label={tpl.favourite ? t('unfavourite') : t('favourite')} onClick={() => toggleFav(tpl)}>
                    {tpl.favourite ? '★' : '☆'}
                  </button>
                )}
              </div>
              <p class="tpl-text">{text}</p>
              {props.onInsert && (
                <button type="button" class="small-btn" data-testid="template-insert" onClick={() => props.onInsert!(text)}>
                  {t('insert')}
                </button>
              )}
              {(props.canEditShared ? tpl.group != null : tpl.group == null) && (
                <div class="row">
                  <button type="button" class="small-btn" data-testid="template-edit" onClick={() => (setEditing(tpl), setCreating(false))}>
                    {t('edit')}
                  </button>
                  <TemplateDelete tpl={tpl} onDone={load} />
                </div>
              )}
              {editing?.id === tpl.id && <TemplateForm existing={tpl} initialText={tpl.text} shared={tpl.group != null} onDone={(ok) => (setEditing(null), ok && load())} />}
            </li>
          );
        })}
      </ul>
      {creating ? (
        <TemplateForm initialText={props.draft ?? ''} shared={props.canEditShared} onDone={(ok) => (setCreating(false), ok && load())} />
      ) : (
        <button type="button" data-testid="template-new" onClick={() => setCreating(true)}>
          {props.canEditShared ? t('new_shared_template') : t('new_personal_template')}
        </button>
      )}
    </section>
  );
}

function TemplateDelete(props: { tpl: Template; onDone: () => void }) {
  const { t, api, notify } = useApp();
  return (
    <button
      type="button"
      class="small-btn danger"
      onClick={async () => {
        if (!confirm(t('confirm_delete', { name: props.tpl.title }))) return;
        try {
          await api.del('/api/templates/' + encodeURIComponent(props.tpl.id));
          props.onDone();
        } catch (e: any) {
          notify(describeError(t, e.code, e.message), 'error');
        }
      }}
    >
      {t('delete')}
    </button>
  );
}

export function TemplateForm(props: { initialText: string; shared: boolean; existing?: Template; onDone: (saved: boolean) => void }) {
  const { t, api } = useApp();
  const [title, setTitle] = useState(props.existing?.title ?? '');
  const [text, setText] = useState(props.initialText);
  const [group, setGroup] = useState(props.existing?.group ?? '');
  const [groups, setGroups] = useState<SkillGroup[]>([]);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    if (props.shared) api.get<{ skill_groups: SkillGroup[] }>('/api/skill-groups').then((r) => setGroups(r.skill_groups)).catch(() => {});
  }, []);
  return (
    <form
      class="stack"
      data-testid="template-form"
      onSubmit={async (e) => {
        e.preventDefault();
        const p = validateTemplate(title, text);
        if (p) return setError(t(('err_' + p) as any));
        if (props.shared && !group) return setError(t('err_group_required'));
        try {
          const body: Record<string, string> = { title: title.trim(), text };
          if (props.shared) body.group = group;
          const id = props.existing?.id ?? templateId(title, Date.now());
          await api.put('/api/templates/' + encodeURIComponent(id), body);
          props.onDone(true);
        } catch (err: any) {
          setError(describeError(t, err.code, err.message));
        }
      }}
    >
      <Field label={t('title')}>
        <input value={title} maxLength={100} required onInput={(e) => setTitle((e.currentTarget as HTMLInputElement).value)} />
      </Field>
      <Field label={t('text')} hint={t('placeholders_hint')}>
        <textarea rows={4} maxLength={4000} value={text} required onInput={(e) => setText((e.currentTarget as HTMLTextAreaElement).value)} />
      </Field>
      {props.shared && (
        <Field label={t('group')}>
          <select value={group} required onChange={(e) => setGroup((e.currentTarget as HTMLSelectElement).value)}>
            <option value="">—</option>
            <GroupOptions groups={groups} />
          </select>
        </Field>
      )}
      <ErrorText error={error} />
      <div class="row">
        <button type="submit" class="primary">
          {t('save')}
        </button>
        <button type="button" onClick={() => props.onDone(false)}>
          {t('cancel')}
        </button>
      </div>
    </form>
  );
}

export function TransferDialog(props: { session: OperatorSession; conv: Conv; me: string | null; onDone: () => void }) {
  const { t, api } = useApp();
  const [mode, setMode] = useState<'operator' | 'group'>('operator');
  const [operators, setOperators] = useState<OperatorStatus[]>([]);
  const [groups, setGroups] = useState<SkillGroup[]>([]);
  const [target, setTarget] = useState('');
  const [comment, setComment] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    api.get<{ operators: OperatorStatus[] }>('/api/operators').then((r) => setOperators(r.operators.filter((o) => o.id !== props.me))).catch(() => {});
    api.get<{ skill_groups: SkillGroup[] }>('/api/skill-groups').then((r) => setGroups(r.skill_groups)).catch(() => {});
  }, []);
  // The target is cleared with the change of mode itself: an effect ran after the next
  // paint, and a choice made in that moment was cleared with it.
  const switchMode = (m: 'operator' | 'group') => {
    if (m === mode) return;
    setMode(m);
    setTarget('');
  };
  return (
    <Dialog title={t('transfer_title', { id: props.conv.id })} onClose={props.onDone} testid="transfer-dialog">
      <form
        class="stack"
        onSubmit={async (e) => {
          e.preventDefault();
          if (!target) return setError(t('err_pick_target'));
          setBusy(true);
          try {
            await props.session.transfer(props.conv.id, mode === 'operator' ? { operator: target } : { group: target }, comment.trim());
            props.onDone();
          } catch (err: any) {
            setError(describeError(t, err.code, err.message));
          } finally {
            setBusy(false);
          }
        }}
      >
        <fieldset class="seg">
          <legend class="sr-only">{t('transfer_to')}</legend>
          <label>
            <input type="radio" name="mode" checked={mode === 'operator'} onChange={() => switchMode('operator')} /> {t('to_operator')}
          </label>
          <label>
            <input type="radio" name="mode" checked={mode === 'group'} onChange={() => switchMode('group')} /> {t('to_group')}
          </label>
        </fieldset>
        <Field label={mode === 'operator' ? t('operator') : t('group')}>
          <select data-testid="transfer-target" value={target} onChange={(e) => setTarget((e.currentTarget as HTMLSelectElement).value)}>
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
          <textarea data-testid="transfer-comment" rows={3} maxLength={4000} value={comment} onInput={(e) => setComment((e.currentTarget as HTMLTextAreaElement).value)} />
        </Field>
        <ErrorText error={error} />
        <div class="row">
          <button type="submit" class="primary" data-testid="transfer-submit" disabled={busy}>
            {t('transfer')}
          </button>
          <button type="button" onClick={props.onDone}>
            {t('cancel')}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

const RESOLUTIONS = ['solved', 'not_solved', 'follow_up', 'spam'] as const;

export function CloseDialog(props: { session: OperatorSession; conv: Conv; onDone: () => void }) {
  const { t } = useApp();
  const [resolution, setResolution] = useState<string>('solved');
  const [tags, setTags] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  return (
    <Dialog title={t('close_title', { id: props.conv.id })} onClose={props.onDone} testid="close-dialog">
      <form
        class="stack"
        onSubmit={async (e) => {
          e.preventDefault();
          const list = parseTags(tags);
          const p = tagsProblem(list);
          if (p) return setError(t(('err_' + p) as any, { n: MAX_TAGS }));
          setBusy(true);
          try {
            await props.session.close(props.conv.id, resolution, list);
            props.onDone();
          } catch (err: any) {
            setError(describeError(t, err.code, err.message));
          } finally {
            setBusy(false);
          }
        }}
      >
        <Field label={t('resolution')}>
          <select data-testid="close-resolution" value={resolution} onChange={(e) => setResolution((e.currentTarget as HTMLSelectElement).value)}>
            {RESOLUTIONS.map((r) => (
              <option key={r} value={r}>
                {t(('resolution_' + r) as any)}
              </option>
            ))}
          </select>
        </Field>
        <Field label={t('tags')} hint={t('tags_hint')}>
          <input data-testid="close-tags" value={tags} onInput={(e) => setTags((e.currentTarget as HTMLInputElement).value)} />
        </Field>
        <ErrorText error={error} />
        <div class="row">
          <button type="submit" class="danger" data-testid="close-submit" disabled={busy}>
            {t('close_conversation')}
          </button>
          <button type="button" onClick={props.onDone}>
            {t('cancel')}
          </button>
        </div>
      </form>
    </Dialog>
  );
}
