/** Administration: skill groups, operators, users, channels, templates (PUT endpoints). */
import { Fragment } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { formatDuration, formatWhen } from '../shared/format';
import type { Translate } from '../shared/i18n';
import { ADAPTER_KINDS, SMTP_SECURITIES, type AccessRuleRow, type AdapterKind, type AdapterView, type AttributePriority, type Channel, type ClosedAction, type GroupHours, type GroupRouting, type OperatorStatus, type Role, type SkillGroup, type UserInfo } from './types';
import { adapterBody, blankAdapter, capacityProblem, idProblem, parsePairs, passwordProblem, showPairs, testMessageProblem, urlProblem, type AdapterDraft } from './forms';
import { CLOSED_ACTIONS, hoursDraft, hoursFromDraft, MAX_STEPS, nextStep, parseWeights, stepDrafts, stepsFromDrafts, type HoursDraft, type StepDraft } from './rules';
import { TemplatesPanel } from './panels';
import { describeError, exclusionText, messageProblemText, refusal, type Key } from './strings';
import { ErrorText, Field, GroupOptions, TabList, TabPanel, useApp } from './ui';

type Section = 'groups' | 'operators' | 'users' | 'channels' | 'templates';

export function AdminView(props: { sections: Section[] }) {
  const { t } = useApp();
  const [section, setSection] = useState<Section>(props.sections[0]);
  return (
    <div class="admin" data-testid="admin">
      <TabList
        id="admin"
        tabs={props.sections}
        current={section}
        onSelect={setSection}
        label={(s) => t(('admin_' + s) as any)}
        ariaLabel={t('administration')}
        testid={(s) => 'admin-tab-' + s}
      />
      <TabPanel id="admin" current={section} class="admin-body">
        {section === 'groups' && (
          <>
            <Groups />
            <RoutingPreview />
          </>
        )}
        {section === 'operators' && (
          <>
            <Operators />
            <ChannelWeights />
            <PauseReasons />
          </>
        )}
        {section === 'users' && <Users />}
        {section === 'channels' && (
          <>
            <Channels />
            <AccessRules />
          </>
        )}
        {section === 'templates' && <TemplatesPanel values={null} canEditShared={true} />}
      </TabPanel>
    </div>
  );
}

function useList<T>(path: string, key: string): [T[] | null, () => void, string | null] {
  const { api, t } = useApp();
  const [list, setList] = useState<T[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const load = () =>
    api
      .get(path)
      .then((r) => (setList(r[key] ?? []), setError(null)))
      .catch((e) => setError(describeError(t, e.code, e.message)));
  useEffect(() => {
    load();
  }, [path]);
  return [list, load, error];
}

/** "Saved." (or `text`, what was done) once a change went through. */
function Saved(props: { ok: boolean; text?: string | null }) {
  const { t } = useApp();
  return props.ok ? (
    <p class="ok small" role="status">
      {props.text ?? t('saved')}
    </p>
  ) : null;
}

function Groups() {
  const { t, api } = useApp();
  const [list, reload, loadError] = useList<SkillGroup>('/api/skill-groups', 'skill_groups');
  const blank: SkillGroup = { id: '', name: '', policy: 'longest_idle', offer_timeout_ms: 30000, sla_ms: 60000, routing: { attribute_priorities: [], ageing_ms: 0, wrap_up_ms: 0, sticky_ms: 0 } };
  const [form, setForm] = useState<SkillGroup>(blank);
  // Steps and hours as typed; turned into JSON (and checked) on save.
  const [steps, setSteps] = useState<StepDraft[]>([]);
  const [hours, setHours] = useState<HoursDraft>(() => hoursDraft(null, localZone()));
  const [error, setError] = useState<string | null>(null);
  const [ok, setOk] = useState(false);
  // An id names a group everywhere (operators, channels, history): fixed once saved.
  const [editing, setEditing] = useState(false);
  const edit = (g: SkillGroup | null) => {
    setForm(g ?? blank);
    setSteps(stepDrafts(g?.steps));
    setHours(hoursDraft(g?.hours, localZone()));
    setEditing(!!g);
    setError(null);
    setOk(false);
  };
  return (
    <div class="admin-grid">
      <table class="table" data-testid="groups-table">
        <thead>
          <tr>
            <th scope="col">{t('id')}</th>
            <th scope="col">{t('name')}</th>
            <th scope="col">{t('policy')}</th>
            <th scope="col">{t('offer_timeout')}</th>
            <th scope="col">{t('sla')}</th>
            <th scope="col">
              <span class="sr-only">{t('edit')}</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {list?.map((g) => (
            <tr key={g.id}>
              <td>{g.id}</td>
              <td>{g.name}</td>
              <td>{t(('policy_' + g.policy) as any)}</td>
              <td>{g.offer_timeout_ms / 1000} s</td>
              <td>{g.sla_ms != null ? g.sla_ms / 1000 + ' s' : '—'}</td>
              <td>
                <button type="button" class="small-btn" aria-label={t('edit_x', { name: g.name })} onClick={() => edit(g)}>
                  {t('edit')}
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <ErrorText error={loadError} />
      <form
        class="stack admin-form"
        onSubmit={async (e) => {
          e.preventDefault();
          setOk(false);
          const p = idProblem(form.id);
          if (p) return setError(t(('err_' + p) as any));
          const stepsJson = stepsFromDrafts(steps);
          if ('problem' in stepsJson) return setError(t(('err_' + stepsJson.problem) as any, { n: stepsJson.step ?? MAX_STEPS }));
          const hoursJson = hoursFromDraft(hours);
          if ('problem' in hoursJson) return setError(t(('err_' + hoursJson.problem) as any, { n: hoursJson.line ?? 0 }));
          try {
            const routing = form.routing ?? { attribute_priorities: [], ageing_ms: 0, wrap_up_ms: 0 };
            const saved = await api.put<SkillGroup>('/api/skill-groups/' + encodeURIComponent(form.id), {
              name: form.name,
              policy: form.policy,
              offer_timeout_ms: Number(form.offer_timeout_ms),
              sla_ms: Number(form.sla_ms ?? 60000),
              routing: { ...routing, attribute_priorities: routing.attribute_priorities.filter((r) => r.attribute.trim()) },
              steps: stepsJson.value,
              hours: hoursJson.value,
            });
            // The server's view: open now or not, and until when.
            setForm({ ...form, hours: saved?.hours ?? hoursJson.value });
            setError(null);
            setOk(true);
            setEditing(true);
            reload();
          } catch (err: any) {
            setError(refusal(t, err));
          }
        }}
      >
        <h2>{editing ? t('edit_x', { name: form.id }) : t('new_group')}</h2>
        <Field label={t('id')} hint={editing ? t('id_fixed') : undefined}>
          <input value={form.id} required readOnly={editing} data-testid="group-id" onInput={(e) => setForm({ ...form, id: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <Field label={t('name')}>
          <input value={form.name} required onInput={(e) => setForm({ ...form, name: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <Field label={t('policy')}>
          <select value={form.policy} onChange={(e) => setForm({ ...form, policy: (e.currentTarget as HTMLSelectElement).value })}>
            <option value="longest_idle">{t('policy_longest_idle')}</option>
            <option value="least_occupied">{t('policy_least_occupied')}</option>
          </select>
        </Field>
        <Field label={t('offer_timeout_s')}>
          <input
            type="number"
            min={1}
            step={1}
            data-testid="group-offer-timeout"
            value={form.offer_timeout_ms / 1000}
            onInput={(e) => setForm({ ...form, offer_timeout_ms: Math.round(Number((e.currentTarget as HTMLInputElement).value) * 1000) })}
          />
        </Field>
        <Field label={t('sla_s')}>
          <input
            type="number"
            min={0}
            step={1}
            data-testid="group-sla"
            value={(form.sla_ms ?? 60000) / 1000}
            onInput={(e) => setForm({ ...form, sla_ms: Math.round(Number((e.currentTarget as HTMLInputElement).value) * 1000) })}
          />
        </Field>
        <RoutingFields routing={form.routing ?? blank.routing!} onChange={(routing) => setForm({ ...form, routing })} />
        <StepsFields steps={steps} groups={(list ?? []).filter((g) => g.id !== form.id)} onChange={setSteps} />
        <HoursFields hours={hours} status={form.hours} groups={(list ?? []).filter((g) => g.id !== form.id)} onChange={setHours} />
        <ErrorText error={error} />
        <Saved ok={ok} />
        <div class="row">
          <button type="submit" class="primary">
            {t('save')}
          </button>
          <button type="button" onClick={() => edit(null)}>
            {t('new')}
          </button>
        </div>
      </form>
    </div>
  );
}

/** Group names by id, for tables (an unknown id shows as itself). */
function groupNames(groups: SkillGroup[] | null, ids: string[]): string {
  return ids.map((id) => groups?.find((g) => g.id === id)?.name ?? id).join(', ');
}

function Operators() {
  const { t, api } = useApp();
  const [list, reload, loadError] = useList<OperatorStatus>('/api/operators', 'operators');
  const [groups] = useList<SkillGroup>('/api/skill-groups', 'skill_groups');
  const blank = { id: '', name: '', capacity: 2, groups: [] as string[], limits: '', only: '', skills: '' };
  const [form, setForm] = useState(blank);
  const [editing, setEditing] = useState(false);
  // A new operator's login, made in the same step (role operator, linked to it).
  const [withLogin, setWithLogin] = useState(true);
  const [login, setLogin] = useState('');
  const [password, setPassword] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [ok, setOk] = useState(false);
  return (
    <div class="admin-grid">
      <table class="table" data-testid="operators-admin-table">
        <thead>
          <tr>
            <th scope="col">{t('id')}</th>
            <th scope="col">{t('name')}</th>
            <th scope="col">{t('capacity')}</th>
            <th scope="col">{t('skills')}</th>
            <th scope="col">
              <span class="sr-only">{t('edit')}</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {list?.map((o) => (
            <tr key={o.id} data-testid="operator-admin-row" data-operator={o.id}>
              <td>{o.id}</td>
              <td>{o.name}</td>
              <td>{o.capacity}</td>
              <td data-testid="operator-groups">{groupNames(groups, o.groups)}</td>
              <td>
                <button
                  type="button"
                  class="small-btn"
                  aria-label={t('edit_x', { name: o.name })}
                  onClick={() => (
                    setForm({
                      id: o.id,
                      name: o.name,
                      capacity: o.capacity,
                      groups: o.groups,
                      limits: showPairs(o.channel_limits),
                      only: (o.channels ?? []).join(', '),
                      skills: showPairs(o.skills),
                    }),
                    setEditing(true),
                    setError(null),
                    setOk(false)
                  )}
                >
                  {t('edit')}
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <ErrorText error={loadError} />
      <form
        class="stack admin-form"
        data-testid="operator-form"
        onSubmit={async (e) => {
          e.preventDefault();
          setOk(false);
          const makeLogin = !editing && withLogin;
          const loginName = login.trim() || form.id;
          const p = idProblem(form.id) ?? capacityProblem(form.capacity) ?? (makeLogin ? idProblem(loginName) ?? passwordProblem(password) : null);
          if (p) return setError(t(('err_' + p) as any));
          try {
            const channel_limits: Record<string, number> = {};
            for (const part of form.limits.split(',')) {
              const [kind, n] = part.split('=').map((x) => x.trim());
              if (kind && n !== undefined && n !== '') channel_limits[kind] = Number(n);
            }
            const channels = form.only
              .split(',')
              .map((x) => x.trim())
              .filter(Boolean);
            await api.put('/api/operators/' + encodeURIComponent(form.id), {
              name: form.name,
              capacity: form.capacity,
              groups: form.groups,
              channel_limits,
              channels,
              skills: parsePairs(form.skills),
            });
            if (makeLogin) {
              await api.put('/api/users/' + encodeURIComponent(loginName), { password, role: 'operator', operator: form.id });
              setPassword('');
              setLogin('');
            }
            setError(null);
            setOk(true);
            setEditing(true);
            reload();
          } catch (err: any) {
            setError(describeError(t, err.code, err.message));
          }
        }}
      >
        <h2>{editing ? t('edit_x', { name: form.id }) : t('new_operator')}</h2>
        <Field label={t('id')} hint={editing ? t('id_fixed') : undefined}>
          <input value={form.id} required readOnly={editing} data-testid="operator-id" onInput={(e) => setForm({ ...form, id: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <Field label={t('name')}>
          <input value={form.name} required data-testid="operator-name" onInput={(e) => setForm({ ...form, name: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <Field label={t('capacity')}>
          <input type="number" min={1} max={100} value={form.capacity} onInput={(e) => setForm({ ...form, capacity: Number((e.currentTarget as HTMLInputElement).value) })} />
        </Field>
        <Field label={t('operator_skills')}>
          <input data-testid="operator-skills" value={form.skills} placeholder="billing=4" onInput={(e) => setForm({ ...form, skills: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <Field label={t('channel_limits')}>
          <input data-testid="operator-channel-limits" value={form.limits} placeholder="email=1" onInput={(e) => setForm({ ...form, limits: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <Field label={t('channel_only')}>
          <input data-testid="operator-channel-only" value={form.only} placeholder="web, email" onInput={(e) => setForm({ ...form, only: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <fieldset class="checks">
          <legend>{t('skills')}</legend>
          {groups?.map((g) => (
            <label key={g.id}>
              <input
                type="checkbox"
                checked={form.groups.includes(g.id)}
                onChange={(e) =>
                  setForm({ ...form, groups: (e.currentTarget as HTMLInputElement).checked ? [...form.groups, g.id] : form.groups.filter((x) => x !== g.id) })
                }
              />{' '}
              {g.name}
            </label>
          ))}
        </fieldset>
        {!editing && (
          <fieldset class="stack">
            <legend>{t('login')}</legend>
            <label>
              <input type="checkbox" data-testid="operator-with-login" checked={withLogin} onChange={(e) => setWithLogin((e.currentTarget as HTMLInputElement).checked)} />{' '}
              {t('create_login')}
            </label>
            {withLogin && (
              <>
                <Field label={t('login')} hint={t('login_defaults_to_id')}>
                  <input value={login} placeholder={form.id} autoComplete="off" data-testid="operator-login" onInput={(e) => setLogin((e.currentTarget as HTMLInputElement).value)} />
                </Field>
                <Field label={t('password')} hint={t('password_hint')}>
                  <input type="password" value={password} autoComplete="new-password" data-testid="operator-password" onInput={(e) => setPassword((e.currentTarget as HTMLInputElement).value)} />
                </Field>
              </>
            )}
          </fieldset>
        )}
        <ErrorText error={error} />
        <Saved ok={ok} />
        <div class="row">
          <button type="submit" class="primary" data-testid="operator-save">
            {t('save')}
          </button>
          <button type="button" onClick={() => (setForm(blank), setEditing(false), setLogin(''), setPassword(''), setError(null), setOk(false))}>
            {t('new')}
          </button>
        </div>
      </form>
    </div>
  );
}

function Users() {
  const { t, api } = useApp();
  const [users, reload, loadError] = useList<UserInfo>('/api/users', 'users');
  const [operators, reloadOperators] = useList<OperatorStatus>('/api/operators', 'operators');
  const [groups] = useList<SkillGroup>('/api/skill-groups', 'skill_groups');
  // The linked operator's skill groups, editable here too (saved on the operator).
  const [skills, setSkills] = useState<string[] | null>(null);
  const [login, setLogin] = useState('');
  const [password, setPassword] = useState('');
  const [role, setRole] = useState<Role>('operator');
  const [operator, setOperator] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [ok, setOk] = useState(false);
  const sorted = users ? [...users].sort((a, b) => (a.login < b.login ? -1 : a.login > b.login ? 1 : 0)) : null;
  // Editing one from the table (its login fixed), not typing a new login that happens
  // to start like an existing one.
  const [editingUser, setEditingUser] = useState(false);
  const exists = editingUser && !!users?.some((u) => u.login === login);
  const linked = operators?.find((o) => o.id === operator);
  const shownSkills = skills ?? linked?.groups ?? [];
  const operatorLabel = (id: string) => {
    const o = operators?.find((x) => x.id === id);
    return o ? o.name + ' (' + id + ')' : id;
  };
  return (
    <div class="admin-grid">
      <table class="table" data-testid="users-table">
        <thead>
          <tr>
            <th scope="col">{t('login')}</th>
            <th scope="col">{t('role')}</th>
            <th scope="col">{t('linked_operator')}</th>
            <th scope="col">
              <span class="sr-only">{t('edit')}</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {sorted?.map((u) => (
            <tr key={u.login} data-testid="user-row" data-login={u.login}>
              <td>{u.login}</td>
              <td>{t(('role_' + u.role) as any)}</td>
              <td>{u.operator ? operatorLabel(u.operator) : '—'}</td>
              <td>
                <button
                  type="button"
                  class="small-btn"
                  aria-label={t('edit_x', { name: u.login })}
                  onClick={() => (setLogin(u.login), setEditingUser(true), setRole(u.role), setOperator(u.operator ?? ''), setSkills(null), setPassword(''), setError(null), setOk(false))}
                >
                  {t('edit')}
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <ErrorText error={loadError} />
      <form
        class="stack admin-form"
        data-testid="user-form"
        onSubmit={async (e) => {
          e.preventDefault();
          setOk(false);
          // Editing an existing login: an empty password keeps the current one.
          const p = idProblem(login) ?? (exists && !password ? null : passwordProblem(password));
          if (p) return setError(t(('err_' + p) as any));
          try {
            const body: Record<string, unknown> = { role, operator: operator || null };
            if (password) body.password = password;
            await api.put('/api/users/' + encodeURIComponent(login), body);
            if (linked && skills && skills.join() !== linked.groups.join()) {
              await api.put('/api/operators/' + encodeURIComponent(linked.id), { name: linked.name, capacity: linked.capacity, groups: skills });
              reloadOperators();
            }
            setError(null);
            setOk(true);
            setPassword('');
            setSkills(null);
            reload();
          } catch (err: any) {
            setError(describeError(t, err.code, err.message));
          }
        }}
      >
        <h2>{exists ? t('edit_x', { name: login }) : t('user_form_title')}</h2>
        <p class="muted small">{t('users_hint')}</p>
        <Field label={t('login')} hint={exists ? t('id_fixed') : undefined}>
          <input value={login} required readOnly={exists} autoComplete="off" data-testid="user-login" onInput={(e) => setLogin((e.currentTarget as HTMLInputElement).value)} />
        </Field>
        <Field label={t('password')} hint={exists ? t('password_keep_hint') : t('password_hint')}>
          <input
            type="password"
            value={password}
            required={!exists}
            autoComplete="new-password"
            data-testid="user-password"
            onInput={(e) => setPassword((e.currentTarget as HTMLInputElement).value)}
          />
        </Field>
        <Field label={t('role')}>
          <select value={role} onChange={(e) => setRole((e.currentTarget as HTMLSelectElement).value as Role)}>
            <option value="operator">{t('role_operator')}</option>
            <option value="supervisor">{t('role_supervisor')}</option>
            <option value="admin">{t('role_admin')}</option>
          </select>
        </Field>
        <Field label={t('linked_operator')}>
          <select value={operator} data-testid="user-operator" onChange={(e) => (setOperator((e.currentTarget as HTMLSelectElement).value), setSkills(null))}>
            <option value="">{t('none')}</option>
            {operators?.map((o) => (
              <option key={o.id} value={o.id}>
                {o.name} ({o.id})
              </option>
            ))}
          </select>
        </Field>
        {linked && (
          <fieldset class="checks" data-testid="user-skills">
            <legend>{t('skills_of', { name: linked.name })}</legend>
            {groups?.map((g) => (
              <label key={g.id}>
                <input
                  type="checkbox"
                  checked={shownSkills.includes(g.id)}
                  onChange={(e) => setSkills((e.currentTarget as HTMLInputElement).checked ? [...shownSkills, g.id] : shownSkills.filter((x) => x !== g.id))}
                />{' '}
                {g.name}
              </label>
            ))}
          </fieldset>
        )}
        <ErrorText error={error} />
        <Saved ok={ok} />
        <div class="row">
          <button type="submit" class="primary">
            {t('save')}
          </button>
          <button type="button" onClick={() => (setLogin(''), setEditingUser(false), setPassword(''), setRole('operator'), setOperator(''), setSkills(null), setError(null), setOk(false))}>
            {t('new')}
          </button>
        </div>
      </form>
    </div>
  );
}

function Channels() {
  const { t, api } = useApp();
  const [list, reload, loadError] = useList<Channel>('/api/channels', 'channels');
  const [groups] = useList<SkillGroup>('/api/skill-groups', 'skill_groups');
  const blank: Channel = { id: '', kind: 'web', name: '', default_group: '' };
  const [form, setForm] = useState<Channel>(blank);
  const [editing, setEditing] = useState(false);
  // The channel being edited as the server keeps it: a messenger one can have an adapter.
  const saved = editing ? list?.find((c) => c.id === form.id) : undefined;
  const [error, setError] = useState<string | null>(null);
  const [ok, setOk] = useState(false);
  return (
    <div class="admin-grid">
      <table class="table" data-testid="channels-table">
        <thead>
          <tr>
            <th scope="col">{t('id')}</th>
            <th scope="col">{t('kind')}</th>
            <th scope="col">{t('name')}</th>
            <th scope="col">{t('default_group')}</th>
            <th scope="col">{t('adapter')}</th>
            <th scope="col">
              <span class="sr-only">{t('edit')}</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {list?.map((c) => (
            <tr key={c.id} data-testid="channel-row" data-channel={c.id}>
              <td>{c.id}</td>
              <td>{c.kind}</td>
              <td>{c.name}</td>
              <td data-testid="channel-group">{groupNames(groups, [c.default_group])}</td>
              <td data-testid="channel-adapter-kind">{c.adapter ? t(('adapter_' + c.adapter) as Key) : '—'}</td>
              <td>
                <button type="button" class="small-btn" aria-label={t('edit_x', { name: c.name })} onClick={() => (setForm(c), setEditing(true), setOk(false))}>
                  {t('edit')}
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <ErrorText error={loadError} />
      <form
        class="stack admin-form"
        onSubmit={async (e) => {
          e.preventDefault();
          setOk(false);
          const p = idProblem(form.id);
          if (p) return setError(t(('err_' + p) as any));
          try {
            await api.put('/api/channels/' + encodeURIComponent(form.id), {
              kind: form.kind,
              name: form.name,
              default_group: form.default_group,
              priority: Number(form.priority ?? 0),
              allow_only: !!form.allow_only,
              blocked_message: form.blocked_message ?? '',
            });
            setError(null);
            setOk(true);
            setEditing(true);
            reload();
          } catch (err: any) {
            setError(describeError(t, err.code, err.message));
          }
        }}
      >
        <h2>{editing ? t('edit_x', { name: form.id }) : t('new_channel')}</h2>
        <Field label={t('id')} hint={editing ? t('id_fixed') : undefined}>
          <input value={form.id} required readOnly={editing} onInput={(e) => setForm({ ...form, id: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <Field label={t('kind')}>
          <input value={form.kind} required list="channel-kinds" onInput={(e) => setForm({ ...form, kind: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <datalist id="channel-kinds">
          <option value="web" />
          <option value="telegram" />
          <option value="whatsapp" />
          <option value="messenger" />
          <option value="viber" />
          <option value="vk" />
          <option value="email" />
          <option value="api" />
        </datalist>
        <Field label={t('name')}>
          <input value={form.name} required onInput={(e) => setForm({ ...form, name: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <label>
          <input type="checkbox" data-testid="channel-allow-only" checked={!!form.allow_only} onChange={(e) => setForm({ ...form, allow_only: (e.currentTarget as HTMLInputElement).checked })} />{' '}
          {t('allow_only')}
        </label>
        <Field label={t('blocked_message')}>
          <input maxLength={4000} data-testid="channel-blocked-message" value={form.blocked_message ?? ''} onInput={(e) => setForm({ ...form, blocked_message: (e.currentTarget as HTMLInputElement).value })} />
        </Field>
        <Field label={t('channel_priority')}>
          <input
            type="number"
            min={0}
            max={100}
            data-testid="channel-priority"
            value={form.priority ?? 0}
            onInput={(e) => setForm({ ...form, priority: Number((e.currentTarget as HTMLInputElement).value) })}
          />
        </Field>
        <Field label={t('default_group')}>
          <select value={form.default_group} required onChange={(e) => setForm({ ...form, default_group: (e.currentTarget as HTMLSelectElement).value })}>
            <option value="">—</option>
            <GroupOptions groups={groups} />
          </select>
        </Field>
        <ErrorText error={error} />
        <Saved ok={ok} />
        <div class="row">
          <button type="submit" class="primary">
            {t('save')}
          </button>
          <button type="button" onClick={() => (setForm(blank), setEditing(false), setError(null), setOk(false))}>
            {t('new')}
          </button>
        </div>
      </form>
      {saved && saved.kind !== 'web' && <ChannelAdapter key={saved.id} channel={saved} onChange={reload} />}
      {saved && <ChannelBot key={'bot:' + saved.id} channel={saved} />}
    </div>
  );
}

/** One of an adapter's settings: the draft's field (and the view's, masked when a
 *  secret), its label and hints, and for a setting that is not a secret what the form
 *  starts from once saved. `options`: chosen from these (each labelled `{label}_{option}`)
 *  rather than typed. */
interface AdapterSetting {
  field: Exclude<keyof AdapterDraft & keyof AdapterView, 'kind'>;
  label: Key;
  hints: Key[];
  secret?: boolean;
  placeholder?: string;
  inputMode?: 'url' | 'numeric' | 'email';
  options?: readonly string[];
}

/** What each adapter kind is set with, in the order shown. */
const ADAPTER_SETTINGS: Record<AdapterKind, AdapterSetting[]> = {
  telegram: [
    { field: 'bot_token', label: 'bot_token', hints: ['bot_token_hint'], secret: true },
    { field: 'secret', label: 'webhook_secret', hints: ['webhook_secret_hint'], secret: true },
    { field: 'api_base', label: 'api_base', hints: ['api_base_hint'], placeholder: 'https://api.telegram.org', inputMode: 'url' },
  ],
  whatsapp: [
    { field: 'access_token', label: 'access_token', hints: ['access_token_hint'], secret: true },
    { field: 'app_secret', label: 'app_secret', hints: ['app_secret_hint'], secret: true },
    { field: 'verify_token', label: 'verify_token', hints: ['verify_token_hint'], secret: true },
    { field: 'phone_number_id', label: 'phone_number_id', hints: ['phone_number_id_hint'], inputMode: 'numeric' },
    { field: 'api_base', label: 'graph_api_base', hints: ['graph_api_base_hint'], placeholder: 'https://graph.facebook.com/v21.0', inputMode: 'url' },
  ],
  messenger: [
    { field: 'page_token', label: 'page_token', hints: ['page_token_hint'], secret: true },
    { field: 'app_secret', label: 'app_secret', hints: ['app_secret_hint'], secret: true },
    { field: 'verify_token', label: 'verify_token', hints: ['verify_token_hint'], secret: true },
    { field: 'api_base', label: 'graph_api_base', hints: ['graph_api_base_hint'], placeholder: 'https://graph.facebook.com/v21.0', inputMode: 'url' },
  ],
  viber: [
    { field: 'auth_token', label: 'auth_token', hints: ['auth_token_hint'], secret: true },
    { field: 'sender_name', label: 'sender_name', hints: ['sender_name_hint'] },
    { field: 'api_base', label: 'viber_api_base', hints: ['viber_api_base_hint'], placeholder: 'https://chatapi.viber.com', inputMode: 'url' },
  ],
  vk: [
    { field: 'access_token', label: 'vk_access_token', hints: ['vk_access_token_hint'], secret: true },
    { field: 'secret', label: 'vk_secret', hints: ['vk_secret_hint'], secret: true },
    { field: 'confirmation', label: 'confirmation', hints: ['confirmation_hint'] },
    { field: 'group_id', label: 'group_id', hints: ['group_id_hint'], inputMode: 'numeric' },
    { field: 'api_base', label: 'vk_api_base', hints: ['vk_api_base_hint'], placeholder: 'https://api.vk.com', inputMode: 'url' },
  ],
  email: [
    { field: 'address', label: 'email_address', hints: ['email_address_hint'], placeholder: 'support@example.com', inputMode: 'email' },
    { field: 'display_name', label: 'display_name', hints: ['display_name_hint'] },
    { field: 'smtp_host', label: 'smtp_host', hints: ['smtp_host_hint'], placeholder: 'smtp.example.com', inputMode: 'url' },
    { field: 'smtp_port', label: 'smtp_port', hints: ['smtp_port_hint'], placeholder: '587', inputMode: 'numeric' },
    { field: 'smtp_security', label: 'smtp_security', hints: ['smtp_security_hint'], options: SMTP_SECURITIES },
    { field: 'smtp_username', label: 'smtp_username', hints: ['smtp_username_hint'] },
    { field: 'smtp_password', label: 'smtp_password', hints: ['smtp_password_hint'], secret: true },
  ],
  api: [{ field: 'outbound_url', label: 'outbound_url', hints: ['outbound_url_hint', 'adapter_api_hint'], placeholder: 'https://adapter.example/outbound', inputMode: 'url' }],
};

/** How to point each messenger at its webhook path (`{path}`), once connected (email
 *  has none: its mail comes in through the node's SMTP listener). */
const WEBHOOK_HINTS: Record<Exclude<AdapterKind, 'api' | 'email'>, Key> = {
  telegram: 'webhook_hint',
  whatsapp: 'whatsapp_webhook_hint',
  messenger: 'messenger_webhook_hint',
  viber: 'viber_webhook_hint',
  vk: 'vk_webhook_hint',
};

/** A saved setting as the summary shows it: a choice by its name (an unknown one, from a
 *  newer server, as it came), an optional one left empty as a dash. */
function settingText(t: Translate<Key>, s: AdapterSetting, value: string | number | undefined): string {
  if (value == null || value === '') return '—';
  return s.options?.includes(String(value)) ? t((s.label + '_' + value) as Key) : String(value);
}

/** The form for a saved adapter: its settings but for the secrets (masked by the server). */
function draftOf(view: AdapterView): AdapterDraft {
  const draft = blankAdapter(view.kind);
  for (const s of ADAPTER_SETTINGS[view.kind]) if (!s.secret) draft[s.field] = String(view[s.field] ?? '');
  return draft;
}

/** A token and signing secret, in full only in the answer that made them: shown that once. */
interface Secrets {
  token: string;
  signing_secret: string;
}

/**
 * What a channel's adapter and bot sections share: the setting as the server keeps it at
 * `path` (undefined while it is read, null when there is none), the secrets a PUT just
 * made (shown once), what went wrong or was done last, and taking the setting away.
 */
function useChannelSetting<T>(path: string, onShow?: (view: T | null) => void, onChange?: () => void) {
  const { t, api } = useApp();
  const [current, setCurrent] = useState<T | null | undefined>(undefined);
  const [secrets, setSecrets] = useState<Secrets | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [done, setDone] = useState<string | null>(null);
  const show = (view: T | null) => {
    setCurrent(view);
    onShow?.(view);
  };
  useEffect(() => {
    api.get<T>(path).then(show, (e) => (e.status === 404 ? show(null) : setError(describeError(t, e.code, e.message))));
  }, [path]);
  const changed = (text: string) => {
    setError(null);
    setDone(text);
    onChange?.();
  };
  const fail = (err: any) => setError(refusal(t, err));
  /** DELETE after the admin confirmed `question`; `text` says it was done. */
  const remove = async (question: string, text: string) => {
    if (!confirm(question)) return;
    try {
      await api.del(path);
      show(null);
      setSecrets(null);
      changed(text);
    } catch (err: any) {
      fail(err);
    }
  };
  return { current, show, secrets, setSecrets, error, setError, done, setDone, changed, fail, remove };
}

/** The secrets a PUT just made, with the "copy now" note, until the admin says they have them. */
function SecretsOnce(props: { secrets: Secrets; tokenLabel: string; testid: string; onDone: () => void }) {
  const { t } = useApp();
  const select = (e: Event) => (e.currentTarget as HTMLInputElement).select();
  return (
    <div class="secrets-once stack" role="alert" data-testid={props.testid + '-secrets'}>
      <p>
        <strong>{t('secrets_once')}</strong>
      </p>
      <Field label={props.tokenLabel}>
        <input readOnly value={props.secrets.token} data-testid={props.testid + '-token'} onFocus={select} />
      </Field>
      <Field label={t('signing_secret')}>
        <input readOnly value={props.secrets.signing_secret} data-testid={props.testid + '-signing-secret'} onFocus={select} />
      </Field>
      <button type="button" data-testid={props.testid + '-secrets-done'} onClick={props.onDone}>
        {t('secrets_copied')}
      </button>
    </div>
  );
}

/**
 * A messenger channel's adapter: what it is now (secrets masked by the server), and a
 * form to connect one, replace it or disconnect it. A Channel API token and signing
 * secret exist in full only in the answer that made them: they are shown that once.
 */
function ChannelAdapter(props: { channel: Channel; onChange: () => void }) {
  const { t, api } = useApp();
  const { channel } = props;
  const path = '/api/channels/' + encodeURIComponent(channel.id) + '/adapter';
  const [draft, setDraft] = useState<AdapterDraft>(() => blankAdapter(channel.adapter ?? ADAPTER_KINDS.find((k) => k === channel.kind) ?? 'api'));
  // The form starts from the adapter there is, but for its secrets (masked by the server).
  const setting = useChannelSetting<AdapterView>(path, (view) => view && setDraft(draftOf(view)), props.onChange);
  const { current, show, secrets, setSecrets } = setting;
  const set = (patch: Partial<AdapterDraft>) => setDraft({ ...draft, ...patch });
  return (
    <section class="stack admin-form adapter" data-testid="channel-adapter" aria-labelledby="adapter-h">
      <h2 id="adapter-h">{t('adapter_of', { name: channel.name })}</h2>
      {current === undefined ? <p class="muted">{t('loading')}</p> : current === null ? <p class="muted small">{t('adapter_none_yet')}</p> : <AdapterSummary view={current} />}
      {secrets && <SecretsOnce secrets={secrets} tokenLabel={t('channel_token')} testid="adapter" onDone={() => setSecrets(null)} />}
      <form
        class="stack"
        data-testid="adapter-form"
        onSubmit={async (e) => {
          e.preventDefault();
          setting.setDone(null);
          const r = adapterBody(draft);
          if ('problem' in r) return setting.setError(t(('err_' + r.problem) as any));
          try {
            const { token, signing_secret, ...view } = await api.put<AdapterView>(path, r.body);
            setSecrets(view.kind === 'api' && token && signing_secret ? { token, signing_secret } : null);
            // What was typed as a secret (a bot token) does not stay on screen.
            show(view);
            setting.changed(t('adapter_connected'));
          } catch (err: any) {
            setting.fail(err);
          }
        }}
      >
        <Field label={t('adapter_kind')}>
          <select
            value={draft.kind}
            data-testid="adapter-kind"
            onChange={(e) => {
              const kind = (e.currentTarget as HTMLSelectElement).value as AdapterKind;
              // An API address is one provider's: it does not carry over to another.
              set({ kind, api_base: kind === current?.kind ? (current.api_base ?? '') : '' });
            }}
          >
            {ADAPTER_KINDS.map((k) => (
              <option key={k} value={k}>
                {t(('adapter_' + k) as Key)}
              </option>
            ))}
          </select>
        </Field>
        {ADAPTER_SETTINGS[draft.kind].map((s) => (
          <Field key={draft.kind + ':' + s.field} label={t(s.label)} hint={s.hints.map((h) => t(h)).join(' ')}>
            {s.options ? (
              <select value={draft[s.field]} data-testid={'adapter-' + s.field.replace(/_/g, '-')} onChange={(e) => set({ [s.field]: (e.currentTarget as HTMLSelectElement).value })}>
                {s.options.map((o) => (
                  <option key={o} value={o}>
                    {t((s.label + '_' + o) as Key)}
                  </option>
                ))}
              </select>
            ) : (
              <input
                value={draft[s.field]}
                autoComplete="off"
                spellcheck={false}
                inputMode={s.inputMode}
                placeholder={s.placeholder}
                data-testid={'adapter-' + s.field.replace(/_/g, '-')}
                onInput={(e) => set({ [s.field]: (e.currentTarget as HTMLInputElement).value })}
              />
            )}
          </Field>
        ))}
        <ErrorText error={setting.error} />
        <Saved ok={!!setting.done} text={setting.done} />
        <div class="row">
          <button type="submit" class="primary" data-testid="adapter-connect">
            {current ? t('adapter_replace') : t('adapter_connect')}
          </button>
          {current && (
            <button
              type="button"
              class="danger"
              data-testid="adapter-disconnect"
              onClick={() => setting.remove(t('confirm_disconnect', { name: channel.name }), t('adapter_disconnected'))}
            >
              {t('adapter_disconnect')}
            </button>
          )}
        </div>
      </form>
      {current && <AdapterTest channel={channel} view={current} />}
    </section>
  );
}

/** How the last test message went (what to show, translated), through the adapter `view`. */
interface TestOutcome {
  view: AdapterView;
  sent?: string;
  problem?: string;
}

/**
 * A test message through the channel's adapter (`POST /api/channels/{id}/test`): sent at
 * once, outside any conversation, to a recipient at the provider, with what the provider
 * answered. An outcome is about the adapter it went through: once that is replaced it is
 * no longer shown.
 */
function AdapterTest(props: { channel: Channel; view: AdapterView }) {
  const { t, api } = useApp();
  const { view } = props;
  const [recipient, setRecipient] = useState('');
  const [text, setText] = useState(() => t('test_text_default'));
  const [outcome, setOutcome] = useState<TestOutcome | null>(null);
  const [busy, setBusy] = useState(false);
  const shown = outcome?.view === view ? outcome : null;
  return (
    <form
      class="stack adapter-test"
      data-testid="adapter-test"
      aria-labelledby="adapter-test-h"
      onSubmit={async (e) => {
        e.preventDefault();
        setOutcome(null);
        const p = testMessageProblem(recipient, text, view.kind);
        if (p) return setOutcome({ view, problem: p === 'recipient_invalid' || p === 'recipient_not_email' ? t(('err_' + p) as Key) : messageProblemText(t, p, text, view.kind) ?? t('err_text_required') });
        setBusy(true);
        try {
          const r = await api.post<{ ok: boolean; provider_id?: string; reason?: string }>('/api/channels/' + encodeURIComponent(props.channel.id) + '/test', {
            recipient: recipient.trim(),
            text: text.trim(),
          });
          setOutcome(r.ok ? { view, sent: t('test_sent', { id: r.provider_id ?? '' }) } : { view, problem: t('test_refused', { reason: r.reason ?? '' }) });
        } catch (err: any) {
          // 400 (the recipient or the text) and 404 (no adapter any more) say why.
          setOutcome({ view, problem: (err.status === 400 || err.status === 404) && err.message ? err.message : describeError(t, err.code, err.message) });
        } finally {
          setBusy(false);
        }
      }}
    >
      <h3 id="adapter-test-h">{t('test_message')}</h3>
      <p class="hint">{t('test_message_hint')}</p>
      <Field label={t('test_recipient')} hint={t(view.kind === 'email' ? 'test_recipient_hint_email' : 'test_recipient_hint')}>
        <input
          value={recipient}
          autoComplete="off"
          spellcheck={false}
          inputMode={view.kind === 'email' ? 'email' : undefined}
          placeholder={view.kind === 'email' ? 'customer@example.com' : undefined}
          data-testid="adapter-test-recipient"
          onInput={(e) => setRecipient((e.currentTarget as HTMLInputElement).value)}
        />
      </Field>
      <Field label={t('test_text')}>
        <textarea rows={2} maxLength={4000} value={text} data-testid="adapter-test-text" onInput={(e) => setText((e.currentTarget as HTMLTextAreaElement).value)} />
      </Field>
      <ErrorText error={shown?.problem} />
      <Saved ok={shown?.sent != null} text={shown?.sent} />
      <div class="row">
        <button type="submit" data-testid="adapter-test-send" disabled={busy}>
          {t('test_send')}
        </button>
      </div>
    </form>
  );
}

/** A channel's bot as `GET/PUT /api/channels/{id}/bot` shows it (the token and signing
 *  secret masked, but in the answer of the PUT that made them). */
interface BotView {
  channel: string;
  url: string;
  token?: string;
  signing_secret?: string;
  api_path: string;
}

/**
 * A channel's bot, which answers its customers before any operator (routing rules 7):
 * its URL now, a form to set or replace it (a new bot token and signing secret, shown
 * once), and removing it.
 */
function ChannelBot(props: { channel: Channel }) {
  const { t, api } = useApp();
  const { channel } = props;
  const path = '/api/channels/' + encodeURIComponent(channel.id) + '/bot';
  const [url, setUrl] = useState('');
  const setting = useChannelSetting<BotView>(path, (view) => setUrl(view?.url ?? ''));
  const { current, secrets, setSecrets } = setting;
  return (
    <section class="stack admin-form adapter" data-testid="channel-bot" aria-labelledby="bot-h">
      <h2 id="bot-h">{t('bot_of', { name: channel.name })}</h2>
      {current === undefined ? (
        <p class="muted">{t('loading')}</p>
      ) : current === null ? (
        <p class="muted small" data-testid="bot-none">
          {t('bot_none')}
        </p>
      ) : (
        <dl class="kv" data-testid="bot-current">
          <dt>{t('bot_url')}</dt>
          <dd data-testid="bot-current-url">{current.url}</dd>
          <dt>{t('bot_api_path')}</dt>
          <dd>
            <code data-testid="bot-api-path">{current.api_path}</code>
          </dd>
        </dl>
      )}
      {secrets && <SecretsOnce secrets={secrets} tokenLabel={t('bot_token')} testid="bot" onDone={() => setSecrets(null)} />}
      <form
        class="stack"
        data-testid="bot-form"
        onSubmit={async (e) => {
          e.preventDefault();
          setting.setDone(null);
          const u = url.trim();
          const p = urlProblem(u);
          if (p) return setting.setError(t(('err_' + p) as Key));
          try {
            const { token, signing_secret, ...view } = await api.put<BotView>(path, { url: u });
            setSecrets(token && signing_secret ? { token, signing_secret } : null);
            setting.show(view);
            setting.changed(t('bot_saved'));
          } catch (err: any) {
            setting.fail(err);
          }
        }}
      >
        <Field label={t('bot_url')} hint={t('bot_url_hint') + ' ' + t('bot_set_hint')}>
          <input
            value={url}
            autoComplete="off"
            spellcheck={false}
            inputMode="url"
            placeholder="https://bot.example/events"
            data-testid="bot-url"
            onInput={(e) => setUrl((e.currentTarget as HTMLInputElement).value)}
          />
        </Field>
        <ErrorText error={setting.error} />
        <Saved ok={!!setting.done} text={setting.done} />
        <div class="row">
          <button type="submit" class="primary" data-testid="bot-set">
            {current ? t('adapter_replace') : t('bot_set')}
          </button>
          {current && (
            <button type="button" class="danger" data-testid="bot-remove" onClick={() => setting.remove(t('confirm_remove_bot', { name: channel.name }), t('bot_removed'))}>
              {t('bot_remove')}
            </button>
          )}
        </div>
      </form>
    </section>
  );
}

/** An adapter's settings as the server shows them (secrets masked), and where the
 *  provider or the adapter reaches Switchboard. */
function AdapterSummary(props: { view: AdapterView }) {
  const { t } = useApp();
  const v = props.view;
  return (
    <>
      <dl class="kv" data-testid="adapter-current" data-kind={v.kind}>
        <dt>{t('adapter')}</dt>
        <dd>{t(('adapter_' + v.kind) as Key)}</dd>
        {ADAPTER_SETTINGS[v.kind].map((s) => (
          <Fragment key={s.field}>
            <dt>{t(s.label)}</dt>
            <dd data-testid={'adapter-current-' + s.field.replace(/_/g, '-')}>{settingText(t, s, v[s.field])}</dd>
          </Fragment>
        ))}
        {v.kind !== 'email' && (
          <>
            <dt>{t(v.kind === 'api' ? 'inbound_path' : 'webhook_path')}</dt>
            <dd>
              <code data-testid={v.kind === 'api' ? 'adapter-inbound-path' : 'adapter-webhook-path'}>{v.kind === 'api' ? v.inbound_path : v.webhook_path}</code>
            </dd>
          </>
        )}
      </dl>
      {v.kind === 'email' ? (
        <p class="hint" data-testid="adapter-inbound-hint">
          {t('email_inbound_hint', { address: v.address ?? '' })}
        </p>
      ) : (
        v.kind !== 'api' && (
          <p class="hint" data-testid="adapter-webhook-hint">
            {t(WEBHOOK_HINTS[v.kind], { path: v.webhook_path ?? '' })}
          </p>
        )
      )}
    </>
  );
}

/** A duration in milliseconds, entered in `unit`s (seconds, hours), whole ones. */
function MsField(props: { label: string; testid: string; unit: number; max?: number; ms: number; onChange: (ms: number) => void }) {
  return (
    <Field label={props.label}>
      <input
        type="number"
        min={0}
        max={props.max}
        step={1}
        data-testid={props.testid}
        value={props.ms / props.unit}
        onInput={(e) => props.onChange(Math.round(Number((e.currentTarget as HTMLInputElement).value) * props.unit))}
      />
    </Field>
  );
}

/** A group's queue order and pacing: wrap-up, ageing, and priorities by attribute. */
function RoutingFields(props: { routing: GroupRouting; onChange: (r: GroupRouting) => void }) {
  const { t } = useApp();
  const r = props.routing;
  const rules = r.attribute_priorities;
  const setRule = (i: number, patch: Partial<AttributePriority>) => props.onChange({ ...r, attribute_priorities: rules.map((x, j) => (j === i ? { ...x, ...patch } : x)) });
  return (
    <fieldset class="stack" data-testid="group-routing">
      <legend>{t('routing_settings')}</legend>
      <MsField label={t('wrap_up_s')} testid="group-wrap-up" unit={1000} max={3600} ms={r.wrap_up_ms ?? 0} onChange={(wrap_up_ms) => props.onChange({ ...r, wrap_up_ms })} />
      <MsField label={t('sticky_h')} testid="group-sticky" unit={3_600_000} max={720} ms={r.sticky_ms ?? 0} onChange={(sticky_ms) => props.onChange({ ...r, sticky_ms })} />
      <Field label={t('required_skills')}>
        <input
          data-testid="group-required-skills"
          defaultValue={showPairs(r.required_skills)}
          key={showPairs(r.required_skills)}
          placeholder="billing=3"
          onChange={(e) => props.onChange({ ...r, required_skills: parsePairs((e.currentTarget as HTMLInputElement).value) })}
        />
      </Field>
      <MsField label={t('remind_s')} testid="group-remind" unit={1000} ms={r.inactivity_remind_ms ?? 0} onChange={(inactivity_remind_ms) => props.onChange({ ...r, inactivity_remind_ms })} />
      <MsField label={t('inactive_s')} testid="group-inactive" unit={1000} ms={r.inactivity_close_ms ?? 0} onChange={(inactivity_close_ms) => props.onChange({ ...r, inactivity_close_ms })} />
      <Field label={t('inactivity_message')}>
        <input maxLength={4000} data-testid="group-inactivity-message" value={r.inactivity_message ?? ''} onInput={(e) => props.onChange({ ...r, inactivity_message: (e.currentTarget as HTMLInputElement).value })} />
      </Field>
      <MsField label={t('ageing_s')} testid="group-ageing" unit={1000} ms={r.ageing_ms ?? 0} onChange={(ageing_ms) => props.onChange({ ...r, ageing_ms })} />
      <table class="table small rules-table">
        <caption class="muted small">{t('attribute_priorities')}</caption>
        <thead>
          <tr>
            <th scope="col">{t('attribute')}</th>
            <th scope="col">{t('value')}</th>
            <th scope="col">{t('priority')}</th>
            <th scope="col">
              <span class="sr-only">{t('remove_rule')}</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {rules.map((rule, i) => (
            <tr key={i} data-testid="priority-rule">
              <td>
                <input aria-label={t('attribute')} value={rule.attribute} onInput={(e) => setRule(i, { attribute: (e.currentTarget as HTMLInputElement).value })} />
              </td>
              <td>
                <input aria-label={t('value')} value={rule.value} onInput={(e) => setRule(i, { value: (e.currentTarget as HTMLInputElement).value })} />
              </td>
              <td>
                <input aria-label={t('priority')} type="number" min={0} max={100} value={rule.priority} onInput={(e) => setRule(i, { priority: Number((e.currentTarget as HTMLInputElement).value) })} />
              </td>
              <td>
                <button type="button" class="ghost small-btn" aria-label={t('remove_rule')} onClick={() => props.onChange({ ...r, attribute_priorities: rules.filter((_, j) => j !== i) })}>
                  ×
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <button type="button" class="small-btn" data-testid="add-priority-rule" onClick={() => props.onChange({ ...r, attribute_priorities: [...rules, { attribute: '', value: '', priority: 10 }] })}>
        {t('add_rule')}
      </button>
    </fieldset>
  );
}

/** The browser's time zone: what a new group's working hours start in. */
function localZone(): string {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
  } catch {
    return 'UTC';
  }
}

/** Checkboxes for other groups (overflow targets). */
function GroupChecks(props: { legend: string; groups: SkillGroup[]; value: string[]; onChange: (ids: string[]) => void }) {
  return (
    <fieldset class="checks">
      <legend>{props.legend}</legend>
      {props.groups.map((g) => (
        <label key={g.id}>
          <input
            type="checkbox"
            checked={props.value.includes(g.id)}
            onChange={(e) => props.onChange((e.currentTarget as HTMLInputElement).checked ? [...props.value, g.id] : props.value.filter((x) => x !== g.id))}
          />{' '}
          {g.name}
        </label>
      ))}
    </fieldset>
  );
}

/**
 * Relaxation steps: while a conversation waits, from each step's time on it needs other
 * skills (or lower levels), and operators of overflow groups may take it too. Step 0 is
 * the group's own skills, from arrival.
 */
function StepsFields(props: { steps: StepDraft[]; groups: SkillGroup[]; onChange: (s: StepDraft[]) => void }) {
  const { t } = useApp();
  const { steps } = props;
  const set = (i: number, patch: Partial<StepDraft>) => props.onChange(steps.map((x, j) => (j === i ? { ...x, ...patch } : x)));
  return (
    <fieldset class="stack" data-testid="group-steps">
      <legend>{t('relaxation_steps')}</legend>
      <p class="hint">{t('relaxation_steps_hint')}</p>
      {steps.map((s, i) => (
        <fieldset key={i} class="stack step" data-testid="group-step">
          <legend>{t('step_n', { n: i + 1 })}</legend>
          <MsField label={t('step_after_s')} testid="step-after" unit={1000} ms={s.after_ms} onChange={(after_ms) => set(i, { after_ms })} />
          <Field label={t('step_skills')} hint={t('step_skills_hint')}>
            <input data-testid="step-skills" value={s.skills} placeholder="billing=2" onInput={(e) => set(i, { skills: (e.currentTarget as HTMLInputElement).value })} />
          </Field>
          <Field label={t('step_max_level')}>
            <select data-testid="step-max-level" value={String(s.max_level)} onChange={(e) => set(i, { max_level: Number((e.currentTarget as HTMLSelectElement).value) })}>
              <option value="0">{t('no_cap')}</option>
              {[1, 2, 3, 4, 5].map((n) => (
                <option key={n} value={String(n)}>
                  {n}
                </option>
              ))}
            </select>
          </Field>
          {props.groups.length > 0 && <GroupChecks legend={t('step_overflow')} groups={props.groups} value={s.overflow} onChange={(overflow) => set(i, { overflow })} />}
          <button type="button" class="ghost small-btn" data-testid="remove-step" onClick={() => props.onChange(steps.filter((_, j) => j !== i))}>
            {t('remove_step', { n: i + 1 })}
          </button>
        </fieldset>
      ))}
      <button type="button" class="small-btn" data-testid="add-step" disabled={steps.length >= MAX_STEPS} onClick={() => props.onChange([...steps, nextStep(steps)])}>
        {t('add_step')}
      </button>
    </fieldset>
  );
}

/** "Open now · closes at 18:00" as the server computed it for the saved hours. */
function HoursStatus(props: { hours: GroupHours }) {
  const { t, lang } = useApp();
  const { open_now, next_change_at } = props.hours;
  if (open_now == null) return null;
  const when = next_change_at != null ? formatWhen(next_change_at, lang) : null;
  return (
    <p class="small" data-testid="hours-status" data-open={String(open_now)}>
      {open_now ? (when ? t('hours_open_until', { time: when }) : t('hours_open')) : when ? t('hours_closed_until', { time: when }) : t('hours_closed')}
    </p>
  );
}

/** Working hours: a weekly schedule and special days in a time zone, and what happens to
 *  a conversation that arrives outside them. */
function HoursFields(props: { hours: HoursDraft; status: GroupHours | null | undefined; groups: SkillGroup[]; onChange: (h: HoursDraft) => void }) {
  const { t } = useApp();
  const h = props.hours;
  const set = (patch: Partial<HoursDraft>) => props.onChange({ ...h, ...patch });
  return (
    <fieldset class="stack" data-testid="group-hours">
      <legend>{t('working_hours')}</legend>
      <label>
        <input type="checkbox" data-testid="hours-on" checked={h.on} onChange={(e) => set({ on: (e.currentTarget as HTMLInputElement).checked })} /> {t('hours_on')}
      </label>
      {props.status && <HoursStatus hours={props.status} />}
      {h.on && (
        <>
          <Field label={t('time_zone')}>
            <input data-testid="hours-zone" value={h.time_zone} placeholder="Europe/Moscow" onInput={(e) => set({ time_zone: (e.currentTarget as HTMLInputElement).value })} />
          </Field>
          <Field label={t('weekly_hours')} hint={t('weekly_hours_hint')}>
            <textarea rows={3} data-testid="hours-weekly" value={h.weekly} placeholder="mon-fri 09:00-18:00" onInput={(e) => set({ weekly: (e.currentTarget as HTMLTextAreaElement).value })} />
          </Field>
          <Field label={t('holidays')} hint={t('holidays_hint')}>
            <textarea rows={2} data-testid="hours-holidays" value={h.holidays} placeholder="2026-12-31 10:00-14:00" onInput={(e) => set({ holidays: (e.currentTarget as HTMLTextAreaElement).value })} />
          </Field>
          <Field label={t('closed_action')}>
            <select data-testid="hours-action" value={h.closed_action} onChange={(e) => set({ closed_action: (e.currentTarget as HTMLSelectElement).value as ClosedAction })}>
              {CLOSED_ACTIONS.map((a) => (
                <option key={a} value={a}>
                  {t(('closed_action_' + a) as any)}
                </option>
              ))}
            </select>
          </Field>
          {h.closed_action === 'transfer' && (
            <Field label={t('closed_transfer_to')}>
              <select data-testid="hours-transfer-to" value={h.transfer_to} onChange={(e) => set({ transfer_to: (e.currentTarget as HTMLSelectElement).value })}>
                <option value="">—</option>
                <GroupOptions groups={props.groups} />
              </select>
            </Field>
          )}
          <Field label={t('closed_message')}>
            <input maxLength={4000} data-testid="hours-message" value={h.message} onInput={(e) => set({ message: (e.currentTarget as HTMLInputElement).value })} />
          </Field>
        </>
      )}
    </fieldset>
  );
}

/** One setting edited as text: read once (a late answer never overwrites what the
 *  admin typed meanwhile), parsed on save (`null`: the message to show), written, and
 *  shown back as the server keeps it. */
function TextSetting(props: {
  name: string;
  title: string;
  /** The field's label when it differs from the title. */
  label?: string;
  hint: string;
  multiline?: boolean;
  placeholder?: string;
  load: () => Promise<string>;
  save: (text: string) => Promise<string | null>;
  invalid: () => string;
}) {
  const { t } = useApp();
  const [text, setText] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [ok, setOk] = useState(false);
  useEffect(() => {
    props
      .load()
      .then((loaded) => setText((current) => current ?? loaded))
      .catch((e) => setError(describeError(t, e.code, e.message)));
  }, []);
  const onInput = (e: Event) => setText((e.currentTarget as HTMLInputElement | HTMLTextAreaElement).value);
  return (
    <form
      class={'stack admin-form ' + props.name}
      data-testid={props.name + '-form'}
      onSubmit={async (e) => {
        e.preventDefault();
        setOk(false);
        try {
          const saved = await props.save(text ?? '');
          if (saved === null) return setError(props.invalid());
          setText(saved);
          setError(null);
          setOk(true);
        } catch (err: any) {
          setError(refusal(t, err));
        }
      }}
    >
      <h2>{props.title}</h2>
      <Field label={props.label ?? props.title} hint={props.hint}>
        {props.multiline ? (
          <textarea rows={4} data-testid={props.name + '-input'} value={text ?? ''} onInput={onInput} />
        ) : (
          <input data-testid={props.name + '-input'} value={text ?? ''} placeholder={props.placeholder} onInput={onInput} />
        )}
      </Field>
      <ErrorText error={error} />
      <Saved ok={ok} />
      <button type="submit" class="primary" data-testid={props.name + '-save'}>
        {t('save')}
      </button>
    </form>
  );
}

/** What one conversation of a channel kind costs of an operator's capacity. */
function ChannelWeights() {
  const { t, api } = useApp();
  type Weights = { weights: Record<string, number> };
  return (
    <TextSetting
      name="channel-weights"
      title={t('channel_weights')}
      label={t('channel_weights_label')}
      hint={t('channel_weights_hint')}
      placeholder="email=2"
      load={async () => showPairs((await api.get<Weights>('/api/routing/weights')).weights)}
      save={async (text) => {
        const weights = parseWeights(text);
        if (!weights) return null;
        const r = await api.put<Weights>('/api/routing/weights', { weights });
        return showPairs(r?.weights ?? weights);
      }}
      invalid={() => t('err_weights')}
    />
  );
}

/** The reasons operators may give for a break. */
function PauseReasons() {
  const { t, api } = useApp();
  return (
    <TextSetting
      name="pause-reasons"
      title={t('pause_reasons')}
      hint={t('pause_reasons_hint')}
      multiline
      load={async () => ((await api.get<{ reasons: string[] }>('/api/pause-reasons')).reasons ?? []).join('\n')}
      save={async (text) => {
        const reasons = text
          .split('\n')
          .map((r) => r.trim())
          .filter(Boolean);
        await api.put('/api/pause-reasons', { reasons });
        return reasons.join('\n');
      }}
      invalid={() => ''}
    />
  );
}

/** Block and allow rules: by address or range, or by verified visitor id. */
function AccessRules() {
  const { t, api } = useApp();
  const [rules, reload, loadError] = useList<AccessRuleRow>('/api/access', 'rules');
  const [channels] = useList<Channel>('/api/channels', 'channels');
  const blank = { list: 'block' as 'block' | 'allow', channel: '', kind: 'ip' as 'ip' | 'visitor', value: '', note: '' };
  const [form, setForm] = useState(blank);
  const [error, setError] = useState<string | null>(null);
  const put = async (body: Record<string, unknown>) => {
    try {
      await api.put('/api/access/rules', body);
      setError(null);
      reload();
      return true;
    } catch (e: any) {
      setError(describeError(t, e.code, e.message));
      return false;
    }
  };
  return (
    <section class="stack access" data-testid="access-rules">
      <h2>{t('access_rules')}</h2>
      <table class="table small">
        <thead>
          <tr>
            <th scope="col">{t('access_list')}</th>
            <th scope="col">{t('channel')}</th>
            <th scope="col">{t('access_value')}</th>
            <th scope="col">{t('access_note')}</th>
            <th scope="col">
              <span class="sr-only">{t('remove_rule')}</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {rules?.map((r) => (
            <tr key={r.list + r.channel + r.kind + r.value} data-testid="access-rule" data-value={r.value}>
              <td>{t(r.list === 'block' ? 'access_block' : 'access_allow')}</td>
              <td>{r.channel ?? t('all_channels')}</td>
              <td>
                {r.kind === 'ip' ? t('access_ip') : t('access_visitor')}: <code>{r.value}</code>
              </td>
              <td>
                {r.note} <span class="muted small">({r.by})</span>
              </td>
              <td>
                <button type="button" class="ghost small-btn" aria-label={t('remove_rule')} data-testid="access-remove" onClick={() => put({ list: r.list, channel: r.channel, kind: r.kind, value: r.value, note: null })}>
                  ×
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <ErrorText error={loadError} />
      <form
        class="row wrap"
        data-testid="access-form"
        onSubmit={async (e) => {
          e.preventDefault();
          if (!form.value.trim()) return;
          const ok = await put({ list: form.list, channel: form.channel || null, kind: form.kind, value: form.value.trim(), note: form.note });
          if (ok) setForm(blank);
        }}
      >
        <select aria-label={t('access_list')} value={form.list} onChange={(e) => setForm({ ...form, list: (e.currentTarget as HTMLSelectElement).value as 'block' | 'allow' })}>
          <option value="block">{t('access_block')}</option>
          <option value="allow">{t('access_allow')}</option>
        </select>
        <select aria-label={t('channel')} value={form.channel} onChange={(e) => setForm({ ...form, channel: (e.currentTarget as HTMLSelectElement).value })}>
          <option value="">{t('all_channels')}</option>
          {channels?.map((c) => (
            <option key={c.id} value={c.id}>
              {c.name}
            </option>
          ))}
        </select>
        <select aria-label={t('access_kind')} value={form.kind} onChange={(e) => setForm({ ...form, kind: (e.currentTarget as HTMLSelectElement).value as 'ip' | 'visitor' })}>
          <option value="ip">{t('access_ip')}</option>
          <option value="visitor">{t('access_visitor')}</option>
        </select>
        <input aria-label={t('access_value')} data-testid="access-value" placeholder={form.kind === 'ip' ? '203.0.113.0/24' : 'v-…'} value={form.value} onInput={(e) => setForm({ ...form, value: (e.currentTarget as HTMLInputElement).value })} />
        <input aria-label={t('access_note')} data-testid="access-note" placeholder={t('access_note')} maxLength={500} value={form.note} onInput={(e) => setForm({ ...form, note: (e.currentTarget as HTMLInputElement).value })} />
        <button type="submit" class="primary" data-testid="access-add">
          {t('add_rule')}
        </button>
      </form>
      <ErrorText error={error} />
    </section>
  );
}

interface PreviewCandidate {
  operator: string;
  name: string;
  load: number;
  capacity: number;
  score: number | null;
  excluded: string | null;
}

/** Who could take the conversation at one relaxation step (0: on arrival). */
interface PreviewStep {
  step: number;
  after_ms: number;
  chosen: string | null;
  candidates: PreviewCandidate[];
}

interface PreviewResult {
  priority: number;
  ahead: number;
  chosen: string | null;
  candidates: PreviewCandidate[];
  /** The step a conversation arriving now is at, and every step (older servers: absent). */
  step?: number;
  steps?: PreviewStep[];
  /** False when the group's working hours say closed now. */
  open?: boolean;
}

/** The steps to show: the server's, or (an older server) the one it answered for. */
function previewSteps(r: PreviewResult): PreviewStep[] {
  return r.steps?.length ? r.steps : [{ step: 0, after_ms: 0, chosen: r.chosen, candidates: r.candidates }];
}

/** "What would happen": for a sample conversation, who could take it and why not. */
function RoutingPreview() {
  const { t, api } = useApp();
  const [groups] = useList<SkillGroup>('/api/skill-groups', 'skill_groups');
  const [group, setGroup] = useState('');
  const [attributes, setAttributes] = useState('');
  const [result, setResult] = useState<PreviewResult | null>(null);
  const [error, setError] = useState<string | null>(null);
  const steps = result ? previewSteps(result) : [];
  return (
    <form
      class="stack admin-form routing-preview"
      data-testid="routing-preview"
      onSubmit={async (e) => {
        e.preventDefault();
        const chosenGroup = group || groups?.[0]?.id;
        if (!chosenGroup) return;
        const attrs: Record<string, string> = {};
        for (const line of attributes.split('\n')) {
          const at = line.indexOf('=');
          if (at > 0) attrs[line.slice(0, at).trim()] = line.slice(at + 1).trim();
        }
        try {
          setResult(await api.post('/api/routing/preview', { group: chosenGroup, attributes: attrs }));
          setError(null);
        } catch (err: any) {
          setError(describeError(t, err.code, err.message));
        }
      }}
    >
      <h2>{t('routing_preview')}</h2>
      <p class="muted small">{t('routing_preview_hint')}</p>
      <Field label={t('group')}>
        <select value={group} data-testid="preview-group" onChange={(e) => setGroup((e.currentTarget as HTMLSelectElement).value)}>
          <GroupOptions groups={groups} />
        </select>
      </Field>
      <Field label={t('attribute_priorities')}>
        <textarea rows={2} data-testid="preview-attributes" placeholder="tier=vip" value={attributes} onInput={(e) => setAttributes((e.currentTarget as HTMLTextAreaElement).value)} />
      </Field>
      <button type="submit" data-testid="preview-run">
        {t('preview')}
      </button>
      <ErrorText error={error} />
      {result && (
        <div data-testid="preview-result">
          <p class="small">{t('preview_result', { priority: result.priority, ahead: result.ahead })}</p>
          {result.open === false && (
            <p class="small" data-testid="preview-closed">
              <strong>{t('preview_closed')}</strong>
            </p>
          )}
          {steps.map((s) => (
            <section key={s.step} class="preview-step" data-testid="preview-step" data-step={s.step}>
              {steps.length > 1 && (
                <h3 class="small">
                  {s.step === 0 ? t('preview_step_arrival') : t('preview_step_after', { n: s.step, time: formatDuration(s.after_ms) })}
                  {s.step === (result.step ?? 0) && <span class="muted"> · {t('preview_step_now')}</span>}
                </h3>
              )}
              {!s.chosen && <p class="small">{s.step === (result.step ?? 0) ? t('preview_nobody') : t('preview_step_nobody')}</p>}
              <table class="table small">
                <tbody>
                  {s.candidates.map((c) => (
                    <tr key={c.operator} data-testid="preview-candidate" data-operator={c.operator} class={c.operator === s.chosen ? 'chosen' : c.excluded ? 'excluded' : ''}>
                      <th scope="row">{c.name}</th>
                      <td>
                        {c.load}/{c.capacity}
                      </td>
                      <td>{c.operator === s.chosen ? '✓ ' + t('preview_chosen') : c.excluded ? exclusionText(t, c.excluded) : c.score}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </section>
          ))}
        </div>
      )}
    </form>
  );
}
