"""TensorFlow's start-up lines are hidden unless --verbose, and a wrong path is answered before
TensorFlow loads."""

import subprocess
import sys
import textwrap

import pytest

from featx import quiet

NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1795519627.457638    6465 port.cc:153] oneDNN custom operations are on.",
    b"I0000 00:00:1795519627.457971    6465 cudart_stub.cc:31] Could not find cuda drivers",
    b"E0000 00:00:1795519632.424446    6465 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
    b"W0000 00:00:1795519632.424446    6465 some_file.cc:12] anything at warning level",
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",  # predict with a .tflite export
]
KEPT = [
    b"E0000 00:00:1795519632.424446    6465 kernel.cc:99] a real error from a kernel",
    b"F0000 00:00:1795519632.424446    6465 check.cc:1] Check failed: x",
    b"Error: Model folder not found: '/no/such/dir'.",
    b"extracting 28/28, 6.2 images/s",
    b"INFO: a line of ours or of another library",
]


def test_the_filter_drops_startup_noise_and_keeps_errors_and_our_lines():
    assert all(quiet.is_noise(line) for line in NOISE)
    assert not any(quiet.is_noise(line) for line in KEPT)


RUN = textwrap.dedent(
    """
    import sys
    from featx import quiet
    quiet.configure(sys.argv[1] == "verbose")
    import tensorflow as tf
    tf.constant([1.0]) + 1.0  # the first op: device probing (cuInit) happens here
    print("featx line", file=sys.stderr)
    """
)


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_hidden_and_verbose_shows_them():
    def stderr(mode):
        out = subprocess.run(
            [sys.executable, "-c", RUN, mode], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        return out.stderr

    quietly, verbose = stderr("quiet"), stderr("verbose")
    assert quietly.strip().splitlines() == ["featx line"]
    assert "featx line" in verbose
    noisy = [line for line in verbose.splitlines() if quiet.is_noise(line.encode())]
    if not noisy:
        pytest.skip("this TensorFlow printed no start-up line: nothing to hide")
    assert not any(line in quietly for line in noisy)


def test_a_wrong_model_folder_is_answered_in_one_line_without_tensorflow():
    code = textwrap.dedent(
        """
        import sys
        from featx.cli import cli
        for args in (["export", "/no/such/dir"], ["finetune", "/no/such.h5", "--head", "x"]):
            try:
                cli(args, standalone_mode=False)
            except Exception as e:
                print(type(e).__name__, e.message if hasattr(e, "message") else e)
        print("tensorflow" in sys.modules, "keras" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("ClickException Model folder not found: '/no/such/dir'")
    assert lines[1].startswith("ClickException Cache not found: '/no/such.h5'")
    assert lines[2] == "False False"
    assert out.stderr == ""
