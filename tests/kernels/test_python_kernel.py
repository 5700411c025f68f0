"""kb-python (ipykernel with our kernel.json) through the Jupyter conformance suite."""

from __future__ import annotations

import jupyter_kernel_test


class PythonConformance(jupyter_kernel_test.KernelTests):
    kernel_name = "kb-python"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    code_generate_error = "raise ValueError('boom')"
    code_execute_result = [{"code": "6 * 7", "result": "42"}]
    code_display_data = [{"code": "from IPython.display import HTML, display;"
                                  " display(HTML('<b>x</b>'))", "mime": "text/html"}]
    # jedi is off in kb-python (its first completion costs ~5 s of CPU): IPython's own completer
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x += 1"]
    invalid_code_samples = ["import = 7q"]
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"
