"""What the terminal shows of Ray's forwarded worker output: ant_ray's lines and real errors, not Ray's noise."""

from ant_ray.stages.ray_logs import without_noise

# As Train V2's controller logs it (logger.warning with exc_info) when busy CPUs delay its resource request.
RESOURCE_REQUEST_WARNING = [
    "Failed to send resource request for train-abc. If this only happens transiently during network partition or "
    "CPU being overloaded, it's safe to ignore this error.",
    "Traceback (most recent call last):",
    '  File "/venv/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58, in '
    "send_resource_request",
    "    ray.get(",
    '  File "python/ray/includes/common.pxi", line 107, in ray._raylet.check_status',
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]


def test_a_noise_warning_goes_with_its_traceback_and_what_follows_stays():
    lines = ["[ant-1_00000] ██░░ 50/200 loss 0.25", *RESOURCE_REQUEST_WARNING, "[ant-1_00001] ████ 100/200 loss 0.14"]
    assert without_noise(lines) == ["[ant-1_00000] ██░░ 50/200 loss 0.25", "[ant-1_00001] ████ 100/200 loss 0.14"]


def test_an_ignored_exception_at_a_trial_processs_exit_is_not_shown():
    ignored = ["Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f8357bb5120>",
               "Traceback (most recent call last):", '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove',
               "    def _remove(item, selfref=ref(self)):", "", '  File "ray/_private/worker.py", line 1063, in '
               "sigterm_handler", "SystemExit: 1"]
    assert without_noise([*ignored, "[ant_ray 22:31:17] merge rung 1: 3 candidates"]) == [
        "[ant_ray 22:31:17] merge rung 1: 3 candidates"]


def test_other_errors_and_their_tracebacks_stay_visible():
    error = ["Traceback (most recent call last):", '  File "train.py", line 3, in loop', "    step()",
             "ValueError: ant.lr too large"]
    assert without_noise(["Reporting training result 3", *error]) == error
    # a noise line logged without a traceback takes nothing with it
    assert without_noise(RESOURCE_REQUEST_WARNING[:1] + ["RuntimeError: real failure"]) == ["RuntimeError: real failure"]
