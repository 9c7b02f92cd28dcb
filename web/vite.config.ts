// Builds the operator workstation: workstation.html + workstation.js + workstation.css
// with fixed names (the Rust gateway embeds them with include_str!). The widget has its
// own build (vite.widget.config.ts); scripts/build.mjs runs both.
import { resolve } from 'node:path';
import { defineConfig } from 'vite';

export const outDir = resolve(__dirname, '../gateway/assets/web');

export default defineConfig({
  root: resolve(__dirname, 'src/workstation'),
  base: './',
  publicDir: false,
  logLevel: 'warn',
  esbuild: { jsx: 'automatic', jsxImportSource: 'preact', legalComments: 'none' },
  build: {
    outDir,
    emptyOutDir: false,
    target: 'es2020',
    modulePreload: false,
    cssCodeSplit: false,
    sourcemap: false,
    reportCompressedSize: false,
    rollupOptions: {
      input: resolve(__dirname, 'src/workstation/workstation.html'),
      output: {
        entryFileNames: 'workstation.js',
        chunkFileNames: 'workstation-[name].js',
        assetFileNames: (info) => (info.names?.some((n) => n.endsWith('.css')) ? 'workstation.css' : '[name][extname]'),
        inlineDynamicImports: true,
      },
    },
  },
});
