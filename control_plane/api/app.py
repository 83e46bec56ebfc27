"""The FastAPI application: routers, error mapping, health endpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from control_plane.api.deps import ServicesDep
from control_plane.api.errors import error_body, install_error_handlers
from control_plane.api.idempotency import IdempotencyMiddleware
from control_plane.api.metrics import router as metrics_router
from control_plane.commands.routes import device_commands_router
from control_plane.commands.routes import router as commands_router
from control_plane.desired.routes import router as config_router
from control_plane.desired.routes import signing_keys_router
from control_plane.devices.routes import certificates_router
from control_plane.devices.routes import router as devices_router
from control_plane.enrollment.routes import router as enrollment_router
from control_plane.groups.routes import router as groups_router
from control_plane.health.routes import router as health_router
from control_plane.provisioning.routes import router as provisioning_router
from control_plane.releases.routes import router as releases_router
from control_plane.rollouts.routes import router as rollouts_router
from control_plane.stores.routes import router as stores_router
from control_plane.templates.routes import router as templates_router

if TYPE_CHECKING:
    from control_plane.runtime import Services


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="storefleet control plane",
        version="0.1.0",
        description="Store Provisioning Platform: stores, enrollment, devices and desired state.",
    )
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(IdempotencyMiddleware, engine=services.engine)
    app.include_router(stores_router)
    app.include_router(provisioning_router)
    app.include_router(templates_router)
    app.include_router(enrollment_router)
    app.include_router(devices_router)
    app.include_router(certificates_router)
    app.include_router(config_router)
    app.include_router(signing_keys_router)
    app.include_router(device_commands_router)
    app.include_router(commands_router)
    app.include_router(groups_router)
    app.include_router(metrics_router)
    app.include_router(releases_router)
    app.include_router(rollouts_router)
    app.include_router(health_router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=None)
    async def readyz(services: ServicesDep) -> dict[str, object] | JSONResponse:
        """Database reachable and the control plane's broker session connected."""
        checks: dict[str, bool] = {"broker": services.link.is_connected}
        try:
            async with services.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            checks["database"] = True
        except Exception:
            checks["database"] = False
        if all(checks.values()):
            return {"status": "ready", "checks": checks}
        return JSONResponse({**error_body("not_ready", "not ready"), "checks": checks}, status_code=503)

    return app
