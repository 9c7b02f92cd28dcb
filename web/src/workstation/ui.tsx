/** Small shared UI pieces: i18n context, store hook, clock hook, dialog, notices. */
import { cloneElement, createContext, isValidElement, type ComponentChildren, type VNode } from 'preact';
import { useContext, useEffect, useMemo, useRef, useState } from 'preact/hooks';
import type { Lang, Translate } from '../shared/i18n';
import { tablistTarget } from '../shared/keys';
import type { Store } from '../shared/store';
import type { Key } from './strings';
import type { Api } from './api';
import { Poller } from './poller';

export interface Ctx {
  lang: Lang;
  t: Translate<Key>;
  setLang: (l: Lang) => void;
  api: Api;
  notify: (text: string, kind?: 'error' | 'info') => void;
}

export const AppCtx = createContext<Ctx>(null as unknown as Ctx);
export const useApp = () => useContext(AppCtx);

/**
 * Subscribes to a store, re-rendering at most once per ~16 ms: a burst of socket frames
 * (a reconnect replay, hundreds of conversations) becomes one render, not hundreds. A
 * timer rather than requestAnimationFrame, so a hidden tab still updates its title.
 */
export function useStore<S>(store: Store<S, any>): S {
  const [state, setState] = useState(store.get());
  useEffect(() => {
    let timer: ReturnType<typeof setTimeout> | null = null;
    setState(store.get());
    const off = store.subscribe(() => {
      if (timer == null)
        timer = setTimeout(() => {
          timer = null;
          setState(store.get());
        }, 16);
    });
    return () => {
      off();
      if (timer != null) clearTimeout(timer);
    };
  }, [store]);
  return state;
}

/**
 * Re-reads something while the component is on screen (a Poller: every `intervalMs`,
 * never two at once, no ticks while the tab is hidden), made again when `deps` change.
 * `fetch` is told whether the poller still runs when its answer comes (else drop it).
 */
export function usePoller(fetch: (running: () => boolean) => Promise<unknown>, intervalMs: number, deps: unknown[]): Poller {
  const poller = useMemo(() => {
    const p: Poller = new Poller({ intervalMs, active: () => document.visibilityState === 'visible', fetch: () => fetch(() => p.running) });
    return p;
  }, deps);
  useEffect(() => {
    poller.start();
    return () => poller.stop();
  }, [poller]);
  return poller;
}

/** Re-renders every `ms` milliseconds and returns the current time. */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const h = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(h);
  }, [ms]);
  return now;
}

/** A modal dialog on <dialog>: focus moves in, Escape closes, focus returns on close. */
export function Dialog(props: { title: string; onClose: () => void; children: ComponentChildren; testid?: string }) {
  const ref = useRef<HTMLDialogElement>(null);
  const { t } = useApp();
  useEffect(() => {
    const d = ref.current!;
    const back = document.activeElement as HTMLElement | null;
    if (!d.open) d.showModal?.();
    const first = d.querySelector<HTMLElement>('input, select, textarea, button:not(.dialog-x)');
    first?.focus();
    return () => back?.focus?.();
  }, []);
  return (
    <dialog
      ref={ref}
      class="dialog"
      aria-label={props.title}
      data-testid={props.testid}
      onCancel={(e) => {
        e.preventDefault();
        props.onClose();
      }}
    >
      <header class="dialog-head">
        <h2>{props.title}</h2>
        <button type="button" class="dialog-x ghost" aria-label={t('close_dialog')} onClick={props.onClose}>
          ×
        </button>
      </header>
      {props.children}
    </dialog>
  );
}

let hintSeq = 0;

/** A labelled form control; the hint sits outside the label and is tied to the control
 *  with aria-describedby, so the control's accessible name stays just the label. */
export function Field(props: { label: string; children: ComponentChildren; hint?: string }) {
  const hintId = useMemo(() => 'hint-' + ++hintSeq, []);
  const child = props.hint && isValidElement(props.children) ? cloneElement(props.children as VNode<any>, { 'aria-describedby': hintId }) : props.children;
  return (
    <div class="field">
      <label class="field">
        <span class="field-label">{props.label}</span>
        {child}
      </label>
      {props.hint && (
        <span class="hint" id={hintId}>
          {props.hint}
        </span>
      )}
    </div>
  );
}

/** One `<option>` per skill group, by id, showing its name. */
export function GroupOptions(props: { groups: { id: string; name: string }[] | null | undefined }) {
  return (
    <>
      {props.groups?.map((g) => (
        <option key={g.id} value={g.id}>
          {g.name}
        </option>
      ))}
    </>
  );
}

export function ErrorText(props: { error: string | null | undefined }) {
  if (!props.error) return null;
  return (
    <p class="error" role="alert">
      {props.error}
    </p>
  );
}

export function Empty(props: { children: ComponentChildren }) {
  return <p class="empty">{props.children}</p>;
}

/**
 * Tabs with the tablist pattern: one Tab stop (the selected tab), arrow keys (wrapping),
 * Home and End move between tabs and select them; each tab controls the panel rendered
 * by <TabPanel> with the same `id`.
 */
export function TabList<T extends string>(props: {
  id: string;
  tabs: readonly T[];
  current: T;
  onSelect: (tab: T) => void;
  label: (tab: T) => string;
  ariaLabel?: string;
  testid?: (tab: T) => string;
}) {
  const ref = useRef<HTMLDivElement>(null);
  const { tabs, current, id } = props;
  return (
    <div
      ref={ref}
      class="tabs"
      role="tablist"
      aria-label={props.ariaLabel}
      onKeyDown={(e) => {
        const i = tabs.indexOf(current);
        const to = tablistTarget(e.key, i, tabs.length);
        if (to == null || e.altKey || e.ctrlKey || e.metaKey) return;
        e.preventDefault();
        props.onSelect(tabs[to]);
        ref.current?.querySelector<HTMLElement>('#' + tabId(id, tabs[to]))?.focus();
      }}
    >
      {tabs.map((x) => (
        <button
          key={x}
          type="button"
          role="tab"
          id={tabId(id, x)}
          aria-selected={x === current}
          aria-controls={id + '-panel'}
          tabIndex={x === current ? 0 : -1}
          data-testid={props.testid?.(x)}
          onClick={() => props.onSelect(x)}
        >
          {props.label(x)}
        </button>
      ))}
    </div>
  );
}

export function TabPanel(props: { id: string; current: string; class?: string; children: ComponentChildren }) {
  return (
    <div class={props.class} role="tabpanel" id={props.id + '-panel'} aria-labelledby={tabId(props.id, props.current)}>
      {props.children}
    </div>
  );
}

function tabId(id: string, tab: string): string {
  return id + '-tab-' + tab;
}

/** The window event a "Reconnect now" button fires; every live socket of the page
 *  listens for it (as for the browser's `online`). */
export const RECONNECT_NOW = 'switchboard-reconnect-now';

export function reconnectNow(): void {
  window.dispatchEvent(new Event(RECONNECT_NOW));
}

/** The window event desk shortcuts fire for the open conversation (detail: `transfer`
 *  or `close`). */
export const SHORTCUT_EVENT = 'switchboard-shortcut';

