// Prints the size of each built file, raw and gzipped.
import { readFileSync, readdirSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const outDir = resolve(dirname(fileURLToPath(import.meta.url)), '../../gateway/assets/web');
let total = 0;
let totalGz = 0;
for (const name of readdirSync(outDir).sort()) {
  const buf = readFileSync(resolve(outDir, name));
  const gz = gzipSync(buf, { level: 9 }).length;
  if (name.endsWith('.js')) {
    total += buf.length;
    totalGz += gz;
  }
  console.log(name.padEnd(20) + String(buf.length).padStart(8) + ' B' + String(gz).padStart(8) + ' B gzip');
}
console.log('all JS'.padEnd(20) + String(total).padStart(8) + ' B' + String(totalGz).padStart(8) + ' B gzip');
