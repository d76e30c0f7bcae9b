"""`sqplus serve` command line: what reaches vLLM's api_server (no server started here; the real server
is exercised in test_vllm_plugin.py::test_openai_server_answers_completions)."""
import sys

from vllm_sqplus.serve import server_command


def test_adds_the_method_and_cpu_memory_share():
    cmd = server_command("/m", ["--port", "9"], cpu_only=True)
    assert cmd[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    assert cmd[cmd.index("--quantization") + 1] == "smoothquant_plus"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.3"
    assert cmd[-2:] == ["--port", "9"]


def test_user_flags_win():
    for extra in (["--gpu-memory-utilization", "0.5"], ["--gpu-memory-utilization=0.5"],
                  ["--kv-cache-memory-bytes", "1073741824"]):
        cmd = server_command("/m", extra, cpu_only=True)
        assert cmd.count("--gpu-memory-utilization") + cmd.count("--gpu-memory-utilization=0.5") <= 1
        assert "0.3" not in cmd
    cmd = server_command("/m", ["--quantization=awq"], cpu_only=False)
    assert "--quantization" not in cmd and "--gpu-memory-utilization" not in cmd
    assert "--quantization" not in server_command("/m", [], quantization_flag=False, cpu_only=False)
