/**
 * Switchboard chat widget. Embed with one tag:
 *   <script src="https://chat.example.com/widget.js" async></script>
 * The server origin is taken from this script's own src. Optional attributes on the tag:
 * data-lang="en|ru", data-channel="web", data-open="true",
 * data-identity="<jwt>": the logged-in customer's identity, a JWT the site signed with the
 *   key an admin set on the channel (PUT /api/channels/{id}/identity; HS256 or RS256, a
 *   `sub` and an `exp`). Sent as `identity` in the `start` frame of the next conversation
 *   (never in `resume`); when it verifies, staff see the visitor as `customer:<key id>:<sub>`.
 * JS API (the script's global, once it has run):
 *   SwitchboardWidget.identify(jwt)   sets that token for the next conversation start, e.g.
 *                                     after the customer logged in on a loaded page;
 *   SwitchboardWidget.identify(null)  forgets it (the customer logged out).
 * The token is the site's credential: the widget keeps it in memory only, never in
 * localStorage or sessionStorage. A conversation already started keeps its visitor.
 * A conversation started with an identity is stored for that customer only: a page
 * without their identity (they logged out, or someone else uses the browser) neither
 * shows nor resumes it; identify() with their token brings it back, with another
 * customer's it is forgotten, as it is when someone starts a conversation meanwhile.
 */
import { render } from 'preact';
import css from './widget.css?inline';
import { WidgetApp } from './app';
import { WidgetSession } from './widget-session';

declare global {
  interface Window {
    __switchboardWidget?: { session: WidgetSession; host: HTMLElement };
    /** This module's exports (the IIFE's global, vite.widget.config.ts `name`). */
    SwitchboardWidget?: { identify(token: string | null): void };
  }
}

function findScript(): HTMLScriptElement | null {
  const cur = document.currentScript as HTMLScriptElement | null;
  if (cur && cur.src) return cur;
  const all = Array.from(document.querySelectorAll<HTMLScriptElement>('script[src]'));
  return all.reverse().find((s) => /\/widget\.js(\?|#|$)/.test(s.src)) ?? null;
}

const script = findScript();

/** The site's identity token for its customer, until the widget is mounted (then the
 *  session holds it). Memory only. */
let identity: string | null = script?.dataset.identity || null;

/** Sets the customer's identity token (a JWT the site signed) for the next conversation
 *  start; null or '' forgets it. Exposed as `SwitchboardWidget.identify`. */
export function identify(token: string | null): void {
  identity = typeof token === 'string' && token.trim() ? token.trim() : null;
  // The mounted widget (possibly from another copy of this script on the page).
  window.__switchboardWidget?.session.identify(identity);
}

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
    identity,
    attributes: () => {
      const a: Record<string, string> = {};
      // Where the visitor is, not what the address carries: a query string or fragment
      // may hold a reset token or an email address, and staff keep what they are sent.
      a.page = (location.origin + location.pathname).slice(0, 200);
      if (navigator.language) a.language = navigator.language.slice(0, 200);
      return a;
    },
  });
  window.__switchboardWidget = { session, host };
  // Another tab of this site started, finished or forgot a conversation.
  window.addEventListener('storage', (e) => session.storageChanged(e.key, e.newValue));
  render(<WidgetApp session={session} langHint={script?.dataset.lang} openHint={script?.dataset.open === 'true'} />, container);
}

if (document.body) mount();
else document.addEventListener('DOMContentLoaded', mount, { once: true });
