/**
 * Starts a real switchboard (`switchboard dev`) on free loopback ports with a fresh data
 * folder, and stops it. The binary embeds gateway/assets/web at compile time; if what it
 * serves is not byte-for-byte the current build (a binary older than the last
 * `npm run build`, or one without the asset routes), a small same-origin shim in front
 * of each listener serves the current files and passes everything else (REST,
 * attachments, WebSockets) through to the real server unchanged. Set
 * SWITCHBOARD_E2E_NO_SHIM=1 to fail instead.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, existsSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const WEB_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const ASSETS = resolve(WEB_ROOT, '../gateway/assets/web');
export const BIN = process.env.SWITCHBOARD_BIN || resolve(WEB_ROOT, '../target/debug/switchboard');

export interface Server {
  /** Where a visitor's browser goes (widget demo at /). */
  publicUrl: string;
  /** Where staff browsers go (workstation at /). */
  privateUrl: string;
  /** The real listeners (same as above unless shimmed). */
  realPublic: string;
  realPrivate: string;
  /** The SMTP listener's `host:port`, when started with `--smtp-addr`. */
  smtpAddr?: string;
  shimmed: boolean;
  logins: Record<string, string>;
  dataDir: string;
  log: () => string;
  stop: () => Promise<void>;
}

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
};

function shim(upstream: string, files: Record<string, string>): Promise<{ url: string; close: () => Promise<void> }> {
  const up = new URL(upstream);
  const sockets = new Set<net.Socket>();
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    const file = files[path];
    if (file && req.method === 'GET') {
      const body = readFileSync(join(ASSETS, file));
      res.writeHead(200, { 'Content-Type': TYPES[file.slice(file.lastIndexOf('.'))] ?? 'application/octet-stream', 'Cache-Control': 'no-store' });
      res.end(body);
      return;
    }
    const headers = { ...req.headers, host: up.host };
    if (headers.origin) headers.origin = up.origin;
    const p = http.request({ host: up.hostname, port: up.port, method: req.method, path: req.url, headers }, (r) => {
      res.writeHead(r.statusCode ?? 502, r.headers);
      r.pipe(res);
    });
    p.on('error', () => {
      res.writeHead(502);
      res.end();
    });
    req.pipe(p);
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.on('upgrade', (req, client, head) => {
    const target = net.connect(Number(up.port), up.hostname, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        const k = req.rawHeaders[i];
        let v = req.rawHeaders[i + 1];
        if (k.toLowerCase() === 'host') v = up.host;
        if (k.toLowerCase() === 'origin') v = up.origin;
        lines.push(`${k}: ${v}`);
      }
      target.write(lines.join('\r\n') + '\r\n\r\n');
      if (head?.length) target.write(head);
      target.pipe(client);
      client.pipe(target);
    });
    sockets.add(target);
    const end = () => {
      client.destroy();
      target.destroy();
    };
    target.on('error', end);
    client.on('error', end);
    target.on('close', end);
    client.on('close', end);
  });
  return new Promise((ok) =>
    server.listen(0, '127.0.0.1', () => {
      const a = server.address() as net.AddressInfo;
      ok({
        url: `http://127.0.0.1:${a.port}`,
        close: () =>
          new Promise<void>((done) => {
            for (const s of sockets) s.destroy();
            server.close(() => done());
          }),
      });
    }),
  );
}

/** Whether the server serves exactly the current build of these files (a binary built
 *  before the last `npm run build` embeds older copies). */
async function servesCurrent(base: string, files: Record<string, string>): Promise<boolean> {
  for (const [path, file] of Object.entries(files)) {
    try {
      const r = await fetch(base + path);
      if (!r.ok || (await r.text()) !== readFileSync(join(ASSETS, file), 'utf8')) return false;
    } catch {
      return false;
    }
  }
  return true;
}

export async function startServer(opts: { extraArgs?: string[]; timeoutMs?: number } = {}): Promise<Server> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  if (!existsSync(BIN)) throw new Error('switchboard binary not found at ' + BIN + ' (set SWITCHBOARD_BIN)');
  if (!existsSync(join(ASSETS, 'workstation.js'))) throw new Error('web build missing: run `npm run build` first');
  const dataDir = mkdtempSync(join(tmpdir(), 'sb-e2e-'));
  const proc: ChildProcess = spawn(BIN, ['dev', '--data-dir', dataDir, '--public-addr', '127.0.0.1:0', '--private-addr', '127.0.0.1:0', ...(opts.extraArgs ?? [])], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
  });
  let out = '';
  let errText = '';
  proc.stderr!.on('data', (d) => {
    errText = (errText + d).slice(-20_000);
  });
  const addrs = await new Promise<{ pub: string; priv: string; smtp?: string }>((ok, fail) => {
    let pub = '';
    let priv = '';
    let smtp: string | undefined;
    const timer = setTimeout(() => fail(new Error('server not ready within ' + timeoutMs + ' ms:\n' + out + errText)), timeoutMs);
    proc.on('exit', (code) => fail(new Error('server exited with ' + code + ':\n' + out + errText)));
    proc.stdout!.on('data', (d) => {
      out += d;
      for (const line of out.split('\n')) {
        const m = /^(public|private) listener: (http:\/\/[^\s]+)/.exec(line.trim());
        if (m && m[1] === 'public') pub = m[2];
        if (m && m[1] === 'private') priv = m[2];
        const mail = /^smtp listener: smtp:\/\/([^\s]+)/.exec(line.trim());
        if (mail) smtp = mail[1];
        if (line.trim() === 'ready' && pub && priv) {
          clearTimeout(timer);
          ok({ pub, priv, smtp });
        }
      }
    });
  });
  const logins = JSON.parse(readFileSync(join(dataDir, 'demo-logins.json'), 'utf8'));
  const closers: (() => Promise<void>)[] = [];
  let publicUrl = addrs.pub;
  let privateUrl = addrs.priv;
  const privateFiles = { '/': 'workstation.html', '/workstation.js': 'workstation.js', '/workstation.css': 'workstation.css' };
  const publicFiles = { '/': 'widget-demo.html', '/widget.js': 'widget.js' };
  const servesWorkstation = await servesCurrent(addrs.priv, privateFiles);
  const servesWidget = await servesCurrent(addrs.pub, publicFiles);
  if ((!servesWorkstation || !servesWidget) && process.env.SWITCHBOARD_E2E_NO_SHIM) {
    proc.kill('SIGKILL');
    throw new Error('the server does not serve the current web build (rebuild the binary after npm run build)');
  }
  if (!servesWorkstation) {
    const s = await shim(addrs.priv, privateFiles);
    privateUrl = s.url;
    closers.push(s.close);
  }
  if (!servesWidget) {
    const s = await shim(addrs.pub, publicFiles);
    publicUrl = s.url;
    closers.push(s.close);
  }
  return {
    publicUrl,
    privateUrl,
    realPublic: addrs.pub,
    realPrivate: addrs.priv,
    smtpAddr: addrs.smtp,
    shimmed: !servesWorkstation || !servesWidget,
    logins,
    dataDir,
    log: () => out + errText,
    stop: async () => {
      for (const c of closers) await c();
      if (proc.exitCode == null) {
        proc.kill('SIGTERM');
        await new Promise<void>((done) => {
          const t = setTimeout(() => {
            proc.kill('SIGKILL');
            done();
          }, 5000);
          proc.on('exit', () => {
            clearTimeout(t);
            done();
          });
        });
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
