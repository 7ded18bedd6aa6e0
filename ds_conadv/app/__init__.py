"""The application layer: the jobs and CLIs built on the library (nothing in the library imports it).

* :mod:`.common` — the bundled data (digits) and model, batching, distributed set-up, evaluation, plots, outputs;
* :mod:`.job_config` — the job config: embedded configs, command-line overrides, validation;
* :mod:`.train` — ``ds-conadv train`` through DeepSpeed; :mod:`.absa_train` — its ABSA variant;
* :mod:`.horovod_train` — the same job under ``horovodrun``;
* :mod:`.hessian_cli` — ``ds-conadv hessian``.

``ds_conadv.cli`` is the console entry point (``ds-conadv``). Old import paths (``ds_conadv.train``,
``ds_conadv.absa_train``, ``ds_conadv.integrations.horovod_train``) re-export from here.
"""
