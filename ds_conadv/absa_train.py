"""Old import path of the ABSA job: :mod:`ds_conadv.app.absa_train`."""
from ds_conadv.app.absa_train import run_absa

__all__ = ["run_absa"]
