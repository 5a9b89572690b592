import { defineConfig } from 'vitest/config';

// Native builds (cmake-js, g++, nvcc) happen inside tests on first use and are cached by content hash,
// so the first test of a file may take minutes on a 2-core machine.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 600_000,
    hookTimeout: 900_000,
    pool: 'forks',
    maxWorkers: 2,
    // skip-reporter names each skipped test with its reason (a missing fixture); the default one only counts them.
    reporters: ['./test/skip-reporter.ts', 'default'],
  },
});
