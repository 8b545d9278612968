"""`benchmarks/gpu_check.sh` runs only in a rare GPU window, so its every row runs here on the CPU at toy sizes
(`--smoke`): a change that breaks a row fails CI instead of wasting the window. No figure is checked."""

from benchmarks import gpu_check
from conftest import shared_ray


def test_every_row_of_the_gpu_check_runs_on_the_cpu(capsys):
    shared_ray()  # the DeMe row's Ray Train run joins the session's Ray (and leaves it running)
    rows = gpu_check.main(["--smoke"])
    failed = [row for row in rows if row[0].startswith("FAILED")]
    assert not failed, failed
    names = [row[0] for row in rows]
    for part in ("sampling", "FID", "ANT step", "merge", "DeMe finetune"):
        assert any(name.startswith(part) for name in names), (part, names)
    assert sum(name.startswith("ANT step") for name in names) == 4  # vanilla, UW, PCGrad, Nash-MTL
    assert "| what (CPU smoke run, toy sizes: not figures) | figure | note |" in capsys.readouterr().out


def test_without_a_gpu_the_real_check_says_so_and_does_nothing(capsys):
    if gpu_check.torch.cuda.is_available():
        return  # on a GPU machine the real check is benchmarks/gpu_check.sh itself
    assert gpu_check.main([]) == []
    assert "no CUDA GPU found" in capsys.readouterr().out
