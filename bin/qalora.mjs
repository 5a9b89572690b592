#!/usr/bin/env node
// Entry point: runs the TypeScript CLI through tsx so that users need no separate build step.
import { register } from 'tsx/esm/api';
register();
const { main } = await import('../runtime/cli.ts');
await main(process.argv);
