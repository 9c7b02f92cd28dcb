/**
 * Switchboard chat widget. Embed with one tag:
 *   <script src="https://chat.example.com/widget.js" async></script>
 * The server origin is taken from this script's own src. Optional attributes on the tag:
 * data-lang="en|ru", data-channel="web", data-open="true".
 */
import { render } from 'preact';
import css from './widget.css?inline';
import { WidgetApp } from './app';
import { WidgetSession } from './widget-session';

declare global {
  interface Window {
    __switchboardWidget?: { session: WidgetSession; host: HTMLElement };
  }
}

function findScript(): HTMLScriptElement | null {
  const cur = document.currentScript as HTMLScriptElement | null;
  if (cur && cur.src) return cur;
  const all = Array.from(document.querySelectorAll<HTMLScriptElement>('script[src]'));
  return all.reverse().find((s) => /\/widget\.js(\?|#|$)/.test(s.src)) ?? null;
}

const script = findScript();

function localStore(): Storage | null {
  try {
    return window.localStorage;
  } catch {
    return null;
  }
}

function mount(): void {
  if (window.__switchboardWidget) return;
  const origin = script?.src ? new URL(script.src, location.href).origin : location.origin;
  const host = document.createElement('div');
  host.id = 'switchboard-widget';
  host.setAttribute('data-testid', 'sb-widget');
  // Keep the host itself neutral whatever the page's CSS says.
  host.style.cssText = 'all: initial; position: fixed; z-index: 2147483000; right: 0; bottom: 0; width: 0; height: 0;';
  document.body.appendChild(host);
  const root = host.attachShadow({ mode: 'open' });
  const style = document.createElement('style');
  style.textContent = css;
  root.appendChild(style);
  const container = document.createElement('div');
  root.appendChild(container);
  const session = new WidgetSession({
    origin,
    storage: localStore(),
    channel: script?.dataset.channel || undefined,
    attributes: () => {
      const a: Record<string, string> = {};
      a.page = location.href.slice(0, 200);
      if (navigator.language) a.language = navigator.language.slice(0, 200);
      return a;
    },
  });
  window.__switchboardWidget = { session, host };
  render(<WidgetApp session={session} langHint={script?.dataset.lang} openHint={script?.dataset.open === 'true'} />, container);
}

if (document.body) mount();
else document.addEventListener('DOMContentLoaded', mount, { once: true });
