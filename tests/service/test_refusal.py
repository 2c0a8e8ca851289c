"""A refusal (the request is wrong) told from an outage (a retry may work), for MLflow's
and Ray's Jobs API's errors."""

from __future__ import annotations

from mlflow.exceptions import RestException

from service.refusal import refused


def test_a_refusal_is_told_from_an_outage() -> None:
    invalid = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "tag 'x'"})
    outage = RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"})
    bad_env = RuntimeError("Request failed with status code 400: runtime_env is invalid.")
    ray_down = RuntimeError("Request failed with status code 503: unavailable.")
    assert refused(invalid) and refused(bad_env)
    assert not refused(ray_down) and not refused(outage) and not refused(ConnectionError("down"))


def test_a_write_to_a_run_that_is_gone_is_refused_for_good() -> None:
    from service.refusal import refused_for_good

    gone = RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "run not found"})
    busy = RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"})
    inactive = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "not active"})
    assert refused_for_good(gone) and not refused(gone)
    assert refused_for_good(inactive)
    assert not refused_for_good(busy) and not refused_for_good(ConnectionError("down"))
