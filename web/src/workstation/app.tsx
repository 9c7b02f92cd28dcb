/** The workstation shell: sign-in, language, role-based sections, connection banner, notices. */
import { useEffect, useMemo, useState } from 'preact/hooks';
import { detectLang, storedLang, storeLang, translator, LANGS, type Lang } from '../shared/i18n';
import type { LinkState } from '../shared/socket';
import { Api } from './api';
import { AdminView } from './admin';
import { Desk } from './desk';
import { FloorView } from './supervisor';
import { DICTS, describeError } from './strings';
import type { LoginInfo, Role } from './types';
import { AppCtx, ErrorText, Field, reconnectNow, useApp, useNow, type Ctx } from './ui';

const AUTH_KEY = 'switchboard.auth';

function loadAuth(): LoginInfo | null {
  try {
    const a = JSON.parse(sessionStorage.getItem(AUTH_KEY) ?? 'null');
    if (a && typeof a.token === 'string' && (!a.until || a.until > Date.now())) return a;
  } catch {
    /* ignore */
  }
  return null;
}

type Tab = 'desk' | 'floor' | 'templates' | 'admin';

export function tabsFor(role: Role, operator: string | null): Tab[] {
  const tabs: Tab[] = [];
  if (operator) tabs.push('desk');
  if (role === 'supervisor' || role === 'admin') tabs.push('floor', 'templates');
  if (role === 'admin') tabs.push('admin');
  return tabs;
}

interface NoticeItem {
  id: number;
  text: string;
  kind: 'error' | 'info';
}

export function App() {
  const [lang, setLangState] = useState<Lang>(() => detectLang(storedLang(localStorage), navigator.languages));
  const t = useMemo(() => translator(DICTS, lang), [lang]);
  const api = useMemo(() => new Api(), []);
  const [auth, setAuth] = useState<LoginInfo | null>(loadAuth);
  const [notices, setNotices] = useState<NoticeItem[]>([]);
  const [link, setLink] = useState<LinkState | null>(null);
  api.token = auth?.token ?? null;

  useEffect(() => {
    document.documentElement.lang = lang;
  }, [lang]);

  const ctx: Ctx = useMemo(
    () => ({
      lang,
      t,
      api,
      setLang: (l: Lang) => {
        storeLang(localStorage, l);
        setLangState(l);
      },
      notify: (text: string, kind: 'error' | 'info' = 'info') => {
        const id = Date.now() + Math.random();
        setNotices((n) => [...n.filter((x) => x.text !== text).slice(-3), { id, text, kind }]);
        setTimeout(() => setNotices((n) => n.filter((x) => x.id !== id)), kind === 'error' ? 8000 : 4000);
      },
    }),
    [lang, t, api],
  );

  const signOut = (message?: string) => {
    sessionStorage.removeItem(AUTH_KEY);
    setAuth(null);
    setLink(null);
    if (message) ctx.notify(message, 'error');
  };
  // Any view's request answered 401 ends the session here too (the floor's and the
  // admin's polls as well as the desk's socket).
  api.onUnauthorized = auth ? () => signOut(t('session_expired')) : null;

  return (
    <AppCtx.Provider value={ctx}>
      <a class="skip" href="#main">
        {t('skip_to_content')}
      </a>
      <header class="topbar">
        <strong class="brand">{t('app_title')}</strong>
        {auth && <Tabs auth={auth} />}
        <span class="grow" />
        <LangSwitch />
        {auth && (
          <>
            <span class="muted small" data-testid="whoami">
              {auth.login} · {t(('role_' + auth.role) as any)}
            </span>
            <button
              type="button"
              class="ghost"
              data-testid="logout"
              onClick={() => {
                // The token stops working on the server too (it has been in socket URLs,
                // which proxies log); signed out here whatever the answer.
                api.post('/api/logout', undefined).catch(() => {});
                signOut();
              }}
            >
              {t('sign_out')}
            </button>
          </>
        )}
      </header>
      {link && link.status !== 'open' && link.status !== 'stopped' && <Banner link={link} />}
      <main id="main" class="main">
        {!auth ? (
          <Login
            onLogin={(a) => {
              const stored = { ...a, until: Date.now() + (a.expires_in ?? 43200) * 1000 - 60000 };
              sessionStorage.setItem(AUTH_KEY, JSON.stringify(stored));
              setAuth(stored);
            }}
          />
        ) : (
          <Shell auth={auth} onAuthLost={() => signOut(t('session_expired'))} onLink={setLink} />
        )}
      </main>
      <div class="notices" role="status" aria-live="polite">
        {notices.map((n) => (
          <div key={n.id} class={'notice notice-' + n.kind} data-testid="notice">
            <span>{n.text}</span>
            <button type="button" class="ghost" aria-label={t('dismiss')} onClick={() => setNotices((x) => x.filter((y) => y.id !== n.id))}>
              ×
            </button>
          </div>
        ))}
      </div>
    </AppCtx.Provider>
  );
}

let currentTab: Tab | null = null;
const tabListeners = new Set<(t: Tab) => void>();
function setTab(t: Tab) {
  currentTab = t;
  location.hash = t;
  for (const l of tabListeners) l(t);
}
function useTab(tabs: Tab[]): Tab {
  const initial = (location.hash.slice(1) as Tab) || currentTab;
  const [tab, set] = useState<Tab>(initial && tabs.includes(initial) ? initial : tabs[0]);
  useEffect(() => {
    tabListeners.add(set);
    return () => void tabListeners.delete(set);
  }, []);
  return tabs.includes(tab) ? tab : tabs[0];
}

function Tabs(props: { auth: LoginInfo }) {
  const { t } = useApp();
  const tabs = tabsFor(props.auth.role, props.auth.operator);
  const tab = useTab(tabs);
  if (tabs.length < 2) return null;
  return (
    <nav class="nav" aria-label={t('sections')}>
      {tabs.map((x) => (
        <button key={x} type="button" class="nav-btn" aria-current={tab === x ? 'page' : undefined} data-testid={'nav-' + x} onClick={() => setTab(x)}>
          {t(('tab_' + x) as any)}
        </button>
      ))}
    </nav>
  );
}

function Shell(props: { auth: LoginInfo; onAuthLost: () => void; onLink: (s: LinkState | null) => void }) {
  const { t } = useApp();
  const tabs = tabsFor(props.auth.role, props.auth.operator);
  const tab = useTab(tabs);
  if (!tabs.length) return <p class="empty">{t('no_sections')}</p>;
  // The desk stays mounted while other tabs are shown, so its socket and state survive.
  return (
    <>
      <h1 class="sr-only">{t(('tab_' + tab) as any)}</h1>
      {tabs.includes('desk') && (
        <div hidden={tab !== 'desk'} class="tab-desk">
          <Desk auth={props.auth} onAuthLost={props.onAuthLost} onLink={props.onLink} shown={tab === 'desk'} />
        </div>
      )}
      {tab === 'floor' && <FloorView auth={props.auth} />}
      {tab === 'templates' && <AdminView sections={['templates']} />}
      {tab === 'admin' && <AdminView sections={['groups', 'operators', 'users', 'channels', 'templates']} />}
    </>
  );
}

function Banner(props: { link: LinkState }) {
  const { t } = useApp();
  const now = useNow(500);
  const wait = props.link.retryAt ? Math.max(0, Math.ceil((props.link.retryAt - now) / 1000)) : 0;
  return (
    <div class="banner" role="alert" data-testid="reconnect-banner">
      {props.link.everHealthy || props.link.attempt ? t('reconnecting', { n: wait }) : t('connecting')}{' '}
      {props.link.status === 'reconnecting' && (
        <button type="button" class="link-btn" data-testid="reconnect-now" onClick={reconnectNow}>
          {t('reconnect_now')}
        </button>
      )}
    </div>
  );
}

function LangSwitch() {
  const { lang, setLang, t } = useApp();
  return (
    <label class="lang">
      <span class="sr-only">{t('language')}</span>
      <select data-testid="lang-switch" value={lang} onChange={(e) => setLang((e.currentTarget as HTMLSelectElement).value as Lang)}>
        {LANGS.map((l) => (
          <option key={l} value={l}>
            {l === 'en' ? 'English' : 'Русский'}
          </option>
        ))}
      </select>
    </label>
  );
}

function Login(props: { onLogin: (a: LoginInfo) => void }) {
  const { t, api } = useApp();
  const [login, setLogin] = useState('');
  const [password, setPassword] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  return (
    <form
      class="login stack"
      data-testid="login-form"
      onSubmit={async (e) => {
        e.preventDefault();
        setBusy(true);
        setError(null);
        try {
          const a = await api.login(login.trim(), password);
          setPassword('');
          props.onLogin(a);
        } catch (err: any) {
          setError(err.status === 401 ? t('err_bad_credentials') : describeError(t, err.code, err.message));
        } finally {
          setBusy(false);
        }
      }}
    >
      <h1>{t('sign_in_title')}</h1>
      <Field label={t('login')}>
        <input data-testid="login-input" name="username" autoComplete="username" required value={login} onInput={(e) => setLogin((e.currentTarget as HTMLInputElement).value)} />
      </Field>
      <Field label={t('password')}>
        <input data-testid="password-input" type="password" name="password" autoComplete="current-password" required value={password} onInput={(e) => setPassword((e.currentTarget as HTMLInputElement).value)} />
      </Field>
      <ErrorText error={error} />
      <button type="submit" class="primary" data-testid="login-submit" disabled={busy}>
        {t('sign_in')}
      </button>
    </form>
  );
}
