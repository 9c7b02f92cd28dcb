/** Entries of one stream, identified by their sequence number. */
export interface Sequenced {
  seq: number;
}

/**
 * Merges `incoming` into `list` (sorted by seq, unique). Entries whose seq is already
 * present are dropped, so a replay after a reconnect never shows a duplicate. Returns
 * the original array when nothing new arrived, so callers can skip re-rendering.
 */
export function mergeBySeq<T extends Sequenced>(list: readonly T[], incoming: readonly T[]): readonly T[] {
  if (!incoming.length) return list;
  let out: T[] | null = null;
  for (const e of incoming) {
    if (!e || typeof e.seq !== 'number') continue;
    const cur: readonly T[] = out ?? list;
    const last = cur.length ? cur[cur.length - 1].seq : -Infinity;
    if (e.seq > last) {
      if (!out) out = list.slice();
      out.push(e);
      continue;
    }
    const i = lowerBound(cur, e.seq);
    if (i < cur.length && cur[i].seq === e.seq) continue; // duplicate
    if (!out) out = list.slice();
    out.splice(i, 0, e);
  }
  return out ?? list;
}

/** Index of the first entry with seq >= target. */
export function lowerBound(list: readonly Sequenced[], target: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (list[mid].seq < target) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The highest seq in a sorted list, or 0. */
export function lastSeq(list: readonly Sequenced[]): number {
  return list.length ? list[list.length - 1].seq : 0;
}
