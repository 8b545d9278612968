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


def test_tunes_copy_racing_a_renamed_state_file_is_dropped_and_other_save_errors_show():
    """The race as Tune logs it (logger.error with exc_info) when its copy of the experiment folder lists a `-tmp-`
    state file that is renamed before it is copied; a real failure to save the state must still reach the user."""
    import logging

    from ant_ray.stages.ray_logs import SyncRaceFilter

    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("ray.tune.execution.experiment_state", logging.ERROR, __file__, 1,
                                 "Saving experiment state to storage at '/runs/merge/tune/rung1' failed with "
                                 "exception: ", None, (type(error), error, None))

    race = FileNotFoundError(2, "Failed to open local file '/tmp/ray/session/artifacts/rung1/driver_artifacts/"
                                ".0962cb3d-tmp-basic-variant-state-2026-12-02_02-35-18.json'")
    assert not SyncRaceFilter().filter(record(race))
    assert SyncRaceFilter().filter(record(PermissionError(13, "Permission denied: '/runs/merge'")))
    assert SyncRaceFilter().filter(record(FileNotFoundError(2, "No such file: '/runs/merge/tune'")))
