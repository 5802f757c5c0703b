from fastapi import APIRouter

from app.api.deps import SettingsDep
from app.bundles import list_bundles, model_public
from app.schemas import ModelsPublic

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def read_models(settings: SettingsDep) -> ModelsPublic:
    """Every loadable bundle under ``DIFFEXP_BUNDLES_DIR`` with its metadata."""
    bundles = list_bundles(settings)
    return ModelsPublic(
        data=[model_public(name, meta) for name, meta in bundles.items()], default=settings.default_model
    )
