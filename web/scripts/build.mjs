// npm run build: type-check, then build the workstation and the widget into
// ../gateway/assets/web with fixed file names, and copy the widget demo page.
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'vite';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..');
const outDir = resolve(root, '../gateway/assets/web');
const expected = ['widget-demo.html', 'widget.js', 'workstation.css', 'workstation.html', 'workstation.js'];

if (!process.argv.includes('--no-typecheck')) {
  execFileSync(process.execPath, [resolve(root, 'node_modules/typescript/bin/tsc'), '--noEmit', '-p', resolve(root, 'tsconfig.json')], {
    stdio: 'inherit',
  });
}

rmSync(outDir, { recursive: true, force: true });
mkdirSync(outDir, { recursive: true });
await build({ configFile: resolve(root, 'vite.config.ts'), mode: 'production' });
await build({ configFile: resolve(root, 'vite.widget.config.ts'), mode: 'production' });
copyFileSync(resolve(root, 'src/widget/widget-demo.html'), resolve(outDir, 'widget-demo.html'));

const got = readdirSync(outDir).sort();
if (JSON.stringify(got) !== JSON.stringify(expected)) {
  console.error('unexpected build output: ' + got.join(', ') + ' (expected ' + expected.join(', ') + ')');
  process.exit(1);
}
execFileSync(process.execPath, [resolve(here, 'sizes.mjs')], { stdio: 'inherit' });
