"""A small Python client for the planning service.

    from api.client import Client
    with Client("http://127.0.0.1:8000") as client:
        answer = client.plan("gpt2-medium", "dgx-a100-80gb", global_batch_size=512, nodes=2)
        print(answer.id, answer.cached, answer.plan.strategy.describe())

Errors the server answers become `ServiceError` (an `AutoparError`, so the CLI prints them as one line).
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel

from api.schemas import (
    ClusterList,
    EvaluateResponse,
    PlanPage,
    PlanResponse,
    ProfileCreated,
    RunPage,
    StoredProfile,
    StoredProfileRef,
    StoredRun,
    ZooModelRef,
    ZooOptions,
)
from planner.cluster import ClusterSpec
from planner.errors import AutoparError
from planner.model_profile import DType, ModelProfile
from planner.run_record import RunRecord
from planner.strategy import Prediction, Strategy

STORED_PROFILE_PREFIX = "prof-"


class ServiceError(AutoparError):
    """The server answered an error (or could not be reached)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


def model_ref(model: str | ModelProfile | BaseModel, *, dtype: DType | str | None = None,
              **size_options: Any) -> dict[str, Any]:
    """The request form of a model: a zoo name (+ size options), a stored profile id ('prof-...'), or a profile."""
    if isinstance(model, ModelProfile):
        return {"kind": "profile", "profile": model.model_dump(mode="json")}
    if isinstance(model, BaseModel):
        return model.model_dump(mode="json", exclude_none=True)
    if model.startswith(STORED_PROFILE_PREFIX):
        return StoredProfileRef(kind="profile_id", profile_id=model).model_dump(mode="json")
    ref = ZooModelRef(kind="zoo", name=model, options=ZooOptions(**size_options),
                      **({"dtype": DType(dtype)} if dtype is not None else {}))
    return ref.model_dump(mode="json", exclude_none=True)


def cluster_ref(cluster: str | ClusterSpec, *, nodes: int | None = None,
                gpus_per_node: int | None = None) -> dict[str, Any]:
    """The request form of a cluster: a preset name (+ nodes) or a full spec."""
    if isinstance(cluster, ClusterSpec):
        if nodes is not None or gpus_per_node is not None:
            cluster = cluster.with_overrides(nodes=nodes, gpus_per_node=gpus_per_node)
        return {"kind": "spec", "spec": cluster.model_dump(mode="json")}
    ref: dict[str, Any] = {"kind": "preset", "name": cluster}
    if nodes is not None:
        ref["nodes"] = nodes
    if gpus_per_node is not None:
        ref["gpus_per_node"] = gpus_per_node
    return ref


class Client:
    """Talks to an `autopar serve` instance."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 300.0) -> None:
        """`base_url` like 'http://127.0.0.1:8000'; `api_key` when the server requires one."""
        headers = {"X-API-Key": api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> Client:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach the autopar server at {self.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                message, code, field = err["message"], err.get("code"), err.get("field")
            except (ValueError, KeyError, TypeError):
                message, code, field = response.text[:500] or response.reason_phrase, None, None
            where = f" (field {field})" if field else ""
            raise ServiceError(f"server answered {response.status_code}: {message}{where}",
                               status=response.status_code, code=code, field=field)
        return response

    def plan(
        self, model: str | ModelProfile | BaseModel, cluster: str | ClusterSpec, *, global_batch_size: int,
        nodes: int | None = None, gpus_per_node: int | None = None, objective: str = "throughput",
        top_k: int = 5, time_limit_s: float | None = None, seed: int = 0, dtype: DType | str | None = None,
        calibrated: bool = False, **size_options: Any,
    ) -> PlanResponse:
        """Ask for the best plan (the server answers a stored one for a repeated request, `cached=True`);
        `calibrated`: on the cluster fitted to the server's stored runs of that cluster name."""
        options: dict[str, Any] = {"objective": objective, "top_k": top_k, "seed": seed}
        if calibrated:
            options["calibrated"] = True
        if time_limit_s is not None:
            options["time_limit_s"] = time_limit_s
        body = {
            "model": model_ref(model, dtype=dtype, **size_options),
            "cluster": cluster_ref(cluster, nodes=nodes, gpus_per_node=gpus_per_node),
            "global_batch_size": global_batch_size,
            "options": options,
        }
        return PlanResponse.model_validate_json(self._call("POST", "/v1/plans", json=body).content)

    def get_plan(self, plan_id: str) -> PlanResponse:
        """A stored plan by id."""
        return PlanResponse.model_validate_json(self._call("GET", f"/v1/plans/{plan_id}").content)

    def list_plans(self, *, limit: int | None = None, offset: int = 0) -> PlanPage:
        """A page of stored plans, newest first."""
        params: dict[str, int] = {"offset": offset} | ({"limit": limit} if limit else {})
        return PlanPage.model_validate_json(self._call("GET", "/v1/plans", params=params).content)

    def delete_plan(self, plan_id: str) -> None:
        """Delete a stored plan."""
        self._call("DELETE", f"/v1/plans/{plan_id}")

    def evaluate(
        self, model: str | ModelProfile | BaseModel, cluster: str | ClusterSpec, strategy: Strategy, *,
        nodes: int | None = None, gpus_per_node: int | None = None, dtype: DType | str | None = None,
        **size_options: Any,
    ) -> Prediction:
        """The server's prediction for a strategy you give (what-if)."""
        body = {
            "model": model_ref(model, dtype=dtype, **size_options),
            "cluster": cluster_ref(cluster, nodes=nodes, gpus_per_node=gpus_per_node),
            "strategy": strategy.model_dump(mode="json"),
        }
        return EvaluateResponse.model_validate_json(self._call("POST", "/v1/evaluate", json=body).content).prediction

    def upload_profile(self, profile: ModelProfile) -> ProfileCreated:
        """Store a profile on the server; its `id` can then stand in for the model in `plan(...)`."""
        return ProfileCreated.model_validate_json(
            self._call("POST", "/v1/profiles", json=profile.model_dump(mode="json")).content
        )

    def get_profile(self, profile_id: str) -> ModelProfile:
        """A stored profile."""
        return StoredProfile.model_validate_json(self._call("GET", f"/v1/profiles/{profile_id}").content).profile

    def post_run(self, record: RunRecord) -> StoredRun:
        """Store a run record on the server (linked to its plan when `record.plan_id` is set)."""
        return StoredRun.model_validate_json(
            self._call("POST", "/v1/runs", content=record.model_dump_json(),
                       headers={"Content-Type": "application/json"}).content)

    def list_runs(self, *, plan_id: str | None = None, cluster: str | None = None, limit: int | None = None,
                  offset: int = 0) -> RunPage:
        """A page of stored runs, newest first."""
        params: dict[str, Any] = {"offset": offset} | ({"limit": limit} if limit else {})
        params |= {k: v for k, v in (("plan_id", plan_id), ("cluster", cluster)) if v is not None}
        return RunPage.model_validate_json(self._call("GET", "/v1/runs", params=params).content)

    def get_run(self, run_id: str) -> RunRecord:
        """A stored run record."""
        return StoredRun.model_validate_json(self._call("GET", f"/v1/runs/{run_id}").content).record

    def clusters(self) -> list[ClusterSpec]:
        """The server's cluster presets."""
        return ClusterList.model_validate_json(self._call("GET", "/v1/clusters").content).presets

    def health(self) -> bool:
        """Whether the server answers /healthz."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False
