// Builds the embeddable widget as one classic script, widget.js (an IIFE: it runs from a
// plain <script async> tag on any site), with its CSS inlined (it goes into the widget's
// shadow root, so it cannot leak into or be affected by the host page).
import { resolve } from 'node:path';
import { defineConfig } from 'vite';
import { outDir } from './vite.config';

export default defineConfig({
  root: __dirname,
  publicDir: false,
  logLevel: 'warn',
  esbuild: { jsx: 'automatic', jsxImportSource: 'preact', legalComments: 'none' },
  define: { 'process.env.NODE_ENV': '"production"' },
  build: {
    outDir,
    emptyOutDir: false,
    target: 'es2018',
    sourcemap: false,
    reportCompressedSize: false,
    lib: {
      entry: resolve(__dirname, 'src/widget/main.tsx'),
      name: 'SwitchboardWidget',
      formats: ['iife'],
      fileName: () => 'widget.js',
    },
    rollupOptions: { output: { inlineDynamicImports: true } },
  },
});
