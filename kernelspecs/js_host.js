'use strict';
// Node.js side of the kb-javascript kernel: one long-lived process per kernel.
//
// Wire: JSON lines. Commands arrive on fd $KB_CMD_FD, events leave on fd $KB_EVENT_FD.
// The program's own stdout/stderr stay the real pipes, so user output (including
// output of child processes) never mixes with control traffic. On Linux, writes to
// pipes from process.stdout/stderr are synchronous, so everything a cell printed is
// already in the pipe when its "done" event is written; the kernel relies on that.
//
// Evaluation goes through the inspector's Runtime.evaluate with replMode: true, the
// mode Chrome DevTools' console uses. V8 then keeps top-level let/const/class/function
// bindings across evaluations, lets a later cell re-declare them (re-running a cell
// with `let x = 1` works, which plain vm scripts or Node's REPL reject), and supports
// top-level await natively. We chose this over rewriting let/const to var ourselves,
// which needs a JavaScript parser (no npm packages at runtime) and loses const/TDZ.
const fs = require('fs');
const inspector = require('inspector');
const net = require('net');
const path = require('path');
const readline = require('readline');
const util = require('util');
const vm = require('vm');
const { createRequire } = require('module');
const { Worker } = require('worker_threads');

const CMD_FD = Number(process.env.KB_CMD_FD);
const EVENT_FD = Number(process.env.KB_EVENT_FD);
const INSPECT = Symbol.for('kernel-bridge.inspect');
const DESCRIBE = Symbol.for('kernel-bridge.describe');
const RUN = Symbol.for('kernel-bridge.run');
const INTERRUPTED = 130; // shell convention for a program stopped by SIGINT

// If the kernel dies without closing our command pipe cleanly (SIGKILL while a cell
// spins), nothing on this busy main thread could notice: a worker thread watches
// for our parent changing and ends the process.
const watchdog = new Worker(`const { ppid } = process;
setInterval(() => { if (process.ppid !== ppid) process.kill(process.pid, 'SIGKILL'); }, 1000);`,
{ eval: true });
watchdog.unref();

const session = new inspector.Session();
session.connect();

function emit(event) {
  fs.writeSync(EVENT_FD, JSON.stringify(event) + '\n');
}

// Give cells what Node's REPL gives: a require that resolves from the working directory.
globalThis.require = createRequire(path.join(process.cwd(), '[kernel]'));
globalThis[INSPECT] = (value) => util.inspect(value, { colors: false, depth: 4 });
globalThis[DESCRIBE] = (error) => describe(error);

function trimStack(stack) {
  const lines = [];
  for (const line of String(stack).split('\n')) {
    // Frames below the user's code belong to this host; cut there.
    if (line.includes('node:inspector') || line.includes(__filename)) break;
    if (line.includes('node:internal/')) continue;
    lines.push(line);
  }
  return lines;
}

function describe(error) {
  if (error instanceof Error || (error && typeof error.stack === 'string')) {
    return {
      ename: String(error.name || (error.constructor && error.constructor.name) || 'Error'),
      evalue: String(error.message),
      traceback: trimStack(error.stack),
    };
  }
  const text = util.inspect(error, { colors: false });
  return { ename: 'Uncaught', evalue: text, traceback: ['Uncaught ' + text] };
}

let current = null; // { id, failed } of the running cell, or null when idle

function failCell(info) {
  if (current && !current.failed) {
    current.failed = true;
    emit({ ev: 'error', id: current.id, ...info });
  } else {
    // Nobody is waiting for this error (it came from a timer after its cell ended,
    // or after the cell already failed): show it on stderr like Node would.
    process.stderr.write(info.traceback.join('\n') + '\n');
  }
}

// The kernel ends a cell only after reading this marker on both streams (see _repl.py).
const END_TOKEN = process.env.KB_END_TOKEN;
function endMarker(id) {
  const marker = `\x01${END_TOKEN}:${id}\x01`;
  for (const fd of [1, 2]) {
    try { fs.writeSync(fd, marker); } catch (e) { /* stream closed by user code */ }
  }
}

function finishCell(id, exitCode) {
  if (!current || current.id !== id) return; // already ended by an interrupt
  // setImmediate lets an unhandled rejection of the last microtasks reach failCell
  // for this cell before we declare it done.
  setImmediate(() => {
    if (!current || current.id !== id) return;
    const code = current.failed ? exitCode || 1 : exitCode;
    current = null;
    session.post('Runtime.releaseObjectGroup', { objectGroup: 'cell' });
    endMarker(id);
    emit({ ev: 'done', id, exit_code: code });
  });
}

process.on('uncaughtException', (error) => failCell(describe(error)));
process.on('unhandledRejection', (reason) => failCell(describe(reason)));
process.on('SIGINT', () => {
  // Reached only while the event loop runs, i.e. the cell awaits something.
  // A busy synchronous loop is stopped by breakOnSigint in execute() instead.
  if (!current) return;
  const id = current.id;
  failCell({ ename: 'KeyboardInterrupt', evalue: 'interrupted', traceback: ['KeyboardInterrupt'] });
  finishCell(id, INTERRUPTED);
});

function callHelper(helper, remote, callback) {
  const arg = 'objectId' in remote ? { objectId: remote.objectId }
    : 'unserializableValue' in remote ? { unserializableValue: remote.unserializableValue }
      : { value: remote.value };
  session.post('Runtime.callFunctionOn', {
    functionDeclaration: `function (v) { return globalThis[Symbol.for(${JSON.stringify(helper)})](v); }`,
    objectId: globalId,
    arguments: [arg],
    returnByValue: true,
    objectGroup: 'cell',
  }, (err, res) => callback(err ? null : res.result.value));
}

function wrapObjectLiteral(code) {
  // Like Node's REPL: `{a: 1}` alone means an object, not a block with a label.
  if (!/^\s*{/.test(code) || /;\s*$/.test(code)) return code;
  try {
    new vm.Script(`(${code})`);
    return `(${code})`;
  } catch {
    return code;
  }
}

function onEvaluated(id, err, res) {
  if (!current || current.id !== id) return;
  if (err) {
    failCell({ ename: 'InternalError', evalue: err.message, traceback: [String(err)] });
    return finishCell(id, 1);
  }
  const details = res.exceptionDetails;
  if (details) {
    return callHelper('kernel-bridge.describe', details.exception || {}, (info) => {
      info = info || { ename: 'Error', evalue: details.text, traceback: [details.text] };
      if (info.ename === 'SyntaxError') {
        info.traceback.push(`    at cell-${id}.js:${details.lineNumber + 1}:${details.columnNumber + 1}`);
      }
      failCell(info);
      finishCell(id, 1);
    });
  }
  if (res.result.type === 'undefined') return finishCell(id, 0);
  callHelper('kernel-bridge.inspect', res.result, (text) => {
    if (text !== null && current && current.id === id) emit({ ev: 'result', id, text });
    finishCell(id, 0);
  });
}

let pendingCode = null;
// The inspector runs the cell's synchronous part inside session.post, so calling it
// from a script run with breakOnSigint lets SIGINT stop a busy loop without killing
// the process: state is kept.
globalThis[RUN] = () => {
  const { id, code } = pendingCode;
  session.post('Runtime.evaluate', {
    expression: `${wrapObjectLiteral(code)}\n//# sourceURL=cell-${id}.js`,
    replMode: true,
    awaitPromise: true,
    objectGroup: 'cell',
  }, (err, res) => onEvaluated(id, err, res));
};
const runner = new vm.Script(`globalThis[Symbol.for('kernel-bridge.run')]()`);

function execute(id, code) {
  current = { id, failed: false };
  pendingCode = { id, code };
  try {
    runner.runInThisContext({ breakOnSigint: true });
  } catch (error) {
    // Only the SIGINT watchdog gets here; user errors come back through the inspector.
    failCell({ ename: 'KeyboardInterrupt', evalue: String(error.message), traceback: ['KeyboardInterrupt'] });
    finishCell(id, INTERRUPTED);
  }
}

function complete(id, code, cursorPos) {
  const before = code.slice(0, cursorPos);
  const match = /([A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*)?\.?([A-Za-z_$][\w$]*)?$/.exec(before);
  const dotted = match && match[0] ? match[0] : '';
  const dot = dotted.lastIndexOf('.');
  const prefix = dot >= 0 ? dotted.slice(dot + 1) : dotted;
  const reply = (names) => emit({
    ev: 'complete_reply', id, start: cursorPos - prefix.length, end: cursorPos,
    matches: [...new Set(names)].filter((n) => n.startsWith(prefix)).sort(),
  });
  const propertyNames = (obj) => {
    const names = [];
    for (let o = obj; o !== null && o !== undefined; o = Object.getPrototypeOf(o)) {
      names.push(...Object.getOwnPropertyNames(o));
    }
    return names;
  };
  if (dot < 0) {
    return session.post('Runtime.globalLexicalScopeNames', {}, (err, res) => {
      reply([...(err ? [] : res.names), ...propertyNames(globalThis)]);
    });
  }
  // Evaluating the object part may run user getters; it is a plain name chain, so
  // it cannot call functions, and throwOnSideEffect guards the rest.
  session.post('Runtime.evaluate', {
    expression: dotted.slice(0, dot), replMode: true, throwOnSideEffect: true, objectGroup: 'complete',
  }, (err, res) => {
    if (err || res.exceptionDetails || !res.result.objectId) return reply([]);
    session.post('Runtime.callFunctionOn', {
      functionDeclaration: 'function () { const n = []; for (let o = this; o; o = Object.getPrototypeOf(o)) n.push(...Object.getOwnPropertyNames(o)); return n; }',
      objectId: res.result.objectId, returnByValue: true,
    }, (err2, res2) => {
      session.post('Runtime.releaseObjectGroup', { objectGroup: 'complete' });
      reply(err2 ? [] : res2.result.value);
    });
  });
}

let globalId = null;
session.post('Runtime.evaluate', { expression: 'globalThis' }, (err, res) => {
  if (err) throw err;
  globalId = res.result.objectId;
  const commands = new net.Socket({ fd: CMD_FD, readable: true, writable: false });
  // The kernel closing our command pipe means it is gone: do not outlive it.
  commands.on('end', () => process.exit(0));
  readline.createInterface({ input: commands }).on('line', (line) => {
    const cmd = JSON.parse(line);
    if (cmd.op === 'execute') execute(cmd.id, cmd.code);
    else if (cmd.op === 'complete') complete(cmd.id, cmd.code, cmd.cursor_pos);
  });
  emit({ ev: 'ready', runtime: `node ${process.version}` });
});
