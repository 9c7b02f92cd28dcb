/**
 * What makes an operator notice an offer or a transfer while looking elsewhere: a short
 * sound (with a mute switch the browser remembers) and, when the tab is in the
 * background, a desktop notification. Permission for notifications is asked when the
 * operator goes online (a click), never at page load.
 */

const MUTE_KEY = 'switchboard.muted';

/** The parts of the browser this module uses (fakes in tests). */
export interface AlertEnv {
  storage: Pick<Storage, 'getItem' | 'setItem'>;
  hidden: () => boolean;
  beep: () => void;
  notification?: {
    permission: () => NotificationPermission;
    request: () => Promise<unknown>;
    show: (title: string, body: string, tag: string) => void;
  };
}

export class Alerts {
  muted: boolean;

  constructor(private readonly env: AlertEnv) {
    this.muted = env.storage.getItem(MUTE_KEY) === '1';
  }

  setMuted(muted: boolean): void {
    this.muted = muted;
    this.env.storage.setItem(MUTE_KEY, muted ? '1' : '0');
  }

  /** Asks for notification permission if it was never asked (call from a click). */
  askPermission(): void {
    const n = this.env.notification;
    if (n && n.permission() === 'default') n.request().catch(() => {});
  }

  /** Something needs the operator: ring (unless muted) and, in the background, notify. */
  alert(title: string, body: string, tag: string): void {
    if (!this.muted) {
      try {
        this.env.beep();
      } catch {
        /* no audio: the notification and the page still say it */
      }
    }
    const n = this.env.notification;
    if (n && this.env.hidden() && n.permission() === 'granted') n.show(title, body, tag);
  }
}

let audio: AudioContext | null = null;

/** Two short tones through Web Audio; silent where the browser has none. */
function beep(): void {
  const Ctx = (globalThis as any).AudioContext ?? (globalThis as any).webkitAudioContext;
  if (!Ctx) return;
  audio ??= new Ctx() as AudioContext;
  const ctx = audio;
  if (ctx.state === 'suspended') ctx.resume().catch(() => {});
  [0, 0.18].forEach((start, i) => {
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.frequency.value = i ? 1046 : 880;
    gain.gain.setValueAtTime(0.0001, ctx.currentTime + start);
    gain.gain.exponentialRampToValueAtTime(0.2, ctx.currentTime + start + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, ctx.currentTime + start + 0.15);
    osc.connect(gain).connect(ctx.destination);
    osc.start(ctx.currentTime + start);
    osc.stop(ctx.currentTime + start + 0.16);
  });
}

export function browserAlerts(): Alerts {
  const N = (globalThis as any).Notification as typeof Notification | undefined;
  return new Alerts({
    storage: localStorage,
    hidden: () => document.visibilityState === 'hidden',
    beep,
    notification: N
      ? {
          permission: () => N.permission,
          request: () => N.requestPermission(),
          show: (title, body, tag) => {
            try {
              new N(title, { body, tag });
            } catch {
              /* some browsers allow notifications only from a service worker */
            }
          },
        }
      : undefined,
  });
}
