/** Attachment limits, mirroring the server (docs/workstation-api.md, "Attachments"). */
export const MAX_ATTACHMENT_BYTES = 5 * 1024 * 1024;
export const MAX_ATTACHMENTS_PER_MESSAGE = 5;

export const ALLOWED_TYPES: readonly string[] = [
  'image/png',
  'image/jpeg',
  'image/gif',
  'image/webp',
  'application/pdf',
  'text/plain',
  'application/msword',
  'application/vnd.openxmlformats-officedocument.wordprocessingml.document',
];

const BY_EXTENSION: Record<string, string> = {
  png: 'image/png',
  jpg: 'image/jpeg',
  jpeg: 'image/jpeg',
  gif: 'image/gif',
  webp: 'image/webp',
  pdf: 'application/pdf',
  txt: 'text/plain',
  doc: 'application/msword',
  docx: 'application/vnd.openxmlformats-officedocument.wordprocessingml.document',
};

/** The accept attribute for file inputs. */
export const ACCEPT_ATTRIBUTE = ALLOWED_TYPES.join(',');

export interface FileLike {
  name: string;
  type: string;
  size: number;
}

/** The content type to upload with: the browser's, else guessed from the extension. */
export function contentTypeOf(file: FileLike): string {
  const t = (file.type || '').toLowerCase().split(';')[0].trim();
  if (t) return t;
  const ext = file.name.toLowerCase().split('.').pop() ?? '';
  return BY_EXTENSION[ext] ?? 'application/octet-stream';
}

export type FileProblem = 'empty' | 'too_large' | 'unsupported_type';

/** Client-side check matching the server's limits; null when the file may be uploaded. */
export function checkAttachment(file: FileLike): FileProblem | null {
  if (file.size <= 0) return 'empty';
  if (file.size > MAX_ATTACHMENT_BYTES) return 'too_large';
  if (!ALLOWED_TYPES.includes(contentTypeOf(file))) return 'unsupported_type';
  return null;
}

export function isImage(contentType: string): boolean {
  return /^image\/(png|jpeg|gif|webp)$/.test(contentType);
}

export function formatBytes(n: number): string {
  if (n < 1024) return n + ' B';
  if (n < 1024 * 1024) return (n / 1024).toFixed(n < 10 * 1024 ? 1 : 0) + ' KB';
  return (n / 1024 / 1024).toFixed(1) + ' MB';
}

/** An attachment as message entries carry it. */
export interface Attachment {
  id: string;
  name: string;
  content_type: string;
  size: number;
}
