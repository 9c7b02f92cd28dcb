/** REST client for the private listener (same origin), with the bearer token. */
import type { LoginInfo } from './types';

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
  ) {
    super(message);
  }
}

export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

export class Api {
  token: string | null = null;
  /** Called when a request made with the token is answered `401`: the session ended
   *  (signed out elsewhere, sessions ended by an admin, a password change, expiry). */
  onUnauthorized: (() => void) | null = null;
  constructor(
    private readonly base = '',
    private readonly fetcher: FetchLike = (i, o) => fetch(i, o),
  ) {}

  async request<T = any>(method: string, path: string, body?: unknown, extra?: { raw?: Blob | ArrayBuffer; contentType?: string }): Promise<T> {
    const headers: Record<string, string> = {};
    const sentWith = this.token;
    if (this.token) headers.Authorization = 'Bearer ' + this.token;
    let payload: BodyInit | undefined;
    if (extra?.raw) {
      payload = extra.raw as BodyInit;
      headers['Content-Type'] = extra.contentType ?? 'application/octet-stream';
    } else if (body !== undefined) {
      payload = JSON.stringify(body);
      headers['Content-Type'] = 'application/json';
    }
    let res: Response;
    try {
      res = await this.fetcher(this.base + path, { method, headers, body: payload });
    } catch (e) {
      throw new ApiError(0, 'network', (e as Error).message || 'network error');
    }
    const text = await res.text();
    let data: any = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    // Only for the session the request was made in: a slow answer to one made before
    // a sign-out and a new sign-in does not end the new session.
    if (res.status === 401 && sentWith && sentWith === this.token && path !== '/api/logout') this.onUnauthorized?.();
    if (!res.ok) {
      const code = data?.code ?? (res.status === 404 ? 'not_found' : res.status === 413 ? 'too_large' : res.status === 415 ? 'unsupported_type' : 'http_' + res.status);
      // `{"code", "message"}`, or `{"error": "..."}` (a bare reason) from some endpoints.
      const message = typeof data?.message === 'string' ? data.message : typeof data?.error === 'string' ? data.error : text || res.statusText;
      throw new ApiError(res.status, code, message);
    }
    return data as T;
  }

  get<T = any>(path: string) {
    return this.request<T>('GET', path);
  }
  put<T = any>(path: string, body: unknown) {
    return this.request<T>('PUT', path, body);
  }
  post<T = any>(path: string, body: unknown) {
    return this.request<T>('POST', path, body);
  }
  del<T = any>(path: string) {
    return this.request<T>('DELETE', path);
  }

  login(login: string, password: string) {
    return this.post<LoginInfo>('/api/login', { login, password });
  }

  /** Downloads a protected file (attachments need the bearer header, so no plain <img src>). */
  async blob(path: string): Promise<Blob> {
    const headers: Record<string, string> = {};
    if (this.token) headers.Authorization = 'Bearer ' + this.token;
    const sentWith = this.token;
    const res = await this.fetcher(this.base + path, { headers });
    if (res.status === 401 && sentWith && sentWith === this.token) this.onUnauthorized?.();
    if (!res.ok) throw new ApiError(res.status, 'http_' + res.status, res.statusText);
    return res.blob();
  }
}

export const enc = encodeURIComponent;
