/** Keyboard navigation of composite widgets (listbox, tablist) as plain functions. */

/**
 * Where a key moves the active option of a vertical listbox of `count` options, from
 * `index` (-1: none yet). `page` is how many options fit in the viewport. Null: not a
 * navigation key, or nothing to move to. Does not wrap, like a native list.
 */
export function listboxTarget(key: string, index: number, count: number, page = 10): number | null {
  if (count <= 0) return null;
  const clamp = (i: number) => Math.max(0, Math.min(count - 1, i));
  switch (key) {
    case 'ArrowDown':
      return index < 0 ? 0 : clamp(index + 1);
    case 'ArrowUp':
      return index < 0 ? 0 : clamp(index - 1);
    case 'Home':
      return 0;
    case 'End':
      return count - 1;
    case 'PageDown':
      return clamp((index < 0 ? 0 : index) + Math.max(1, page - 1));
    case 'PageUp':
      return clamp((index < 0 ? 0 : index) - Math.max(1, page - 1));
    default:
      return null;
  }
}

/**
 * Where a key moves the selection of a horizontal tablist of `count` tabs from `index`:
 * arrows wrap around, Home and End go to the ends. Null: not a tablist key.
 */
export function tablistTarget(key: string, index: number, count: number): number | null {
  if (count <= 0) return null;
  switch (key) {
    case 'ArrowRight':
      return (index + 1) % count;
    case 'ArrowLeft':
      return (index - 1 + count) % count;
    case 'Home':
      return 0;
    case 'End':
      return count - 1;
    default:
      return null;
  }
}
