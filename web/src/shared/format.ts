/** "0:07", "4:05", "1:02:03" for a duration in milliseconds (negative counts as 0). */
export function formatDuration(ms: number): string {
  const total = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const ss = String(s).padStart(2, '0');
  if (h) return h + ':' + String(m).padStart(2, '0') + ':' + ss;
  return m + ':' + ss;
}

/** Seconds left until a deadline, rounded up, never negative. */
export function secondsLeft(deadline: number, now: number): number {
  return Math.max(0, Math.ceil((deadline - now) / 1000));
}

export function formatClock(at: number, lang: string): string {
  return new Date(at).toLocaleTimeString(lang, { hour: '2-digit', minute: '2-digit' });
}

export function formatDateTime(at: number, lang: string): string {
  return new Date(at).toLocaleString(lang, { dateStyle: 'short', timeStyle: 'short' });
}

/** The time of day for today's moments, the date too for older ones. */
export function formatWhen(at: number, lang: string, now: number = Date.now()): string {
  const a = new Date(at);
  const n = new Date(now);
  const today = a.getFullYear() === n.getFullYear() && a.getMonth() === n.getMonth() && a.getDate() === n.getDate();
  return today ? formatClock(at, lang) : formatDateTime(at, lang);
}

