import { defineConfig } from 'vitest/config';

export default defineConfig({
  esbuild: { jsx: 'automatic', jsxImportSource: 'preact' },
  test: {
    root: __dirname,
    include: ['test/**/*.test.ts'],
    environment: 'node',
  },
});
