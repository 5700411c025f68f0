"""kb-ruby: Ruby cells run in one long-lived ``ruby`` process (``rb_host.rb``)."""

from __future__ import annotations

from typing import Any, ClassVar

from kernelspecs._repl import ReplKernel, launch, runtime_version


class RubyKernel(ReplKernel):
    runtime: ClassVar[str] = "ruby"
    host_script: ClassVar[str] = "rb_host.rb"
    # Ruby would otherwise pick the locale's external encoding (often US-ASCII in
    # containers) and garble UTF-8 string literals in cells.
    host_args: ClassVar[tuple[str, ...]] = ("-E", "UTF-8:UTF-8")
    implementation = "kb-ruby"
    implementation_version = "0.1.0"
    banner = "Ruby kernel of kernel-bridge: local variables persist across cells"
    language_info: ClassVar[dict[str, Any]] = {  # type: ignore[misc]
        "name": "ruby",
        "version": runtime_version("ruby", "-e", "print RUBY_VERSION"),
        "mimetype": "text/x-ruby",
        "file_extension": ".rb",
        "pygments_lexer": "ruby",
        "codemirror_mode": "ruby",
    }


if __name__ == "__main__":
    launch(RubyKernel)
