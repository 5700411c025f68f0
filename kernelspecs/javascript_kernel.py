"""kb-javascript: JavaScript cells run in one long-lived Node.js process (``js_host.js``)."""

from __future__ import annotations

from typing import Any, ClassVar

from kernelspecs._repl import ReplKernel, launch, runtime_version


class JavaScriptKernel(ReplKernel):
    runtime: ClassVar[str] = "node"
    host_script: ClassVar[str] = "js_host.js"
    implementation = "kb-javascript"
    implementation_version = "0.1.0"
    banner = "JavaScript (Node.js) kernel of kernel-bridge: state persists across cells"
    language_info: ClassVar[dict[str, Any]] = {  # type: ignore[misc]
        "name": "javascript",
        "version": runtime_version("node", "--version"),
        "mimetype": "application/javascript",
        "file_extension": ".js",
        "pygments_lexer": "javascript",
        "codemirror_mode": "javascript",
    }


if __name__ == "__main__":
    launch(JavaScriptKernel)
