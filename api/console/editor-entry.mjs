// The console's code editor: CodeMirror 6 with a language switch. Bundled by `make console`
// (esbuild) into editor.js, exposed as the global KBEditor; the page itself needs no build.
import { basicSetup } from "codemirror";
import { EditorView, keymap } from "@codemirror/view";
import { Compartment } from "@codemirror/state";
import { StreamLanguage } from "@codemirror/language";
import { python } from "@codemirror/lang-python";
import { javascript } from "@codemirror/lang-javascript";
import { cpp } from "@codemirror/lang-cpp";
import { java } from "@codemirror/lang-java";
import { rust } from "@codemirror/lang-rust";
import { ruby } from "@codemirror/legacy-modes/mode/ruby";
import { shell } from "@codemirror/legacy-modes/mode/shell";
import { go } from "@codemirror/legacy-modes/mode/go";

const MODES = {
  python: () => python(),
  javascript: () => javascript(),
  c: () => cpp(),
  cpp: () => cpp(),
  java: () => java(),
  rust: () => rust(),
  ruby: () => StreamLanguage.define(ruby),
  bash: () => StreamLanguage.define(shell),
  go: () => StreamLanguage.define(go),
};

export function create(parent, { doc = "", language = "python", onRun = () => {} } = {}) {
  const mode = new Compartment();
  const run = { key: "Mod-Enter", run: () => { onRun(); return true; } };
  const view = new EditorView({
    doc,
    parent,
    extensions: [keymap.of([run]), basicSetup, mode.of((MODES[language] || MODES.python)())],
  });
  return {
    view,
    getValue: () => view.state.doc.toString(),
    setValue: (text) => view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } }),
    setLanguage: (name) => view.dispatch({ effects: mode.reconfigure((MODES[name] || MODES.python)()) }),
  };
}
