/** Small shared UI pieces: i18n context, store hook, clock hook, dialog, notices. */
import { cloneElement, createContext, isValidElement, type ComponentChildren, type VNode } from 'preact';
import { useContext, useEffect, useMemo, useRef, useState } from 'preact/hooks';
import type { Lang, Translate } from '../shared/i18n';
import type { Store } from '../shared/store';
import type { Key } from './strings';
import type { Api } from './api';

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
