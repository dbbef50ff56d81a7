"""The robustness audit of a deployed ONNX classifier: clean, verified and robust accuracy, and a verdict per example.

:func:`run_audit` is behind both ``hydra-pipe audit MODEL.onnx`` and the pipeline's audit stage. Its phases, each a
module, run cheapest first, each only on what the ones before it left undecided (neither proven robust nor broken):

1. :mod:`~pipeline.audit.deployed`: the input checks, clean accuracy on the deployed numerics (onnxruntime), the
   graph form attacks and bounds run on, and its parity with onnxruntime (no proof is claimed beyond float32's
   rounding);
2. :mod:`~pipeline.audit.verify`: IBP and CROWN (Gowal et al. 2018; Zhang et al. 2018); ops without a bound rule
   (LRN, a Softmax inside the network) skip verification and the report names them; the attacks still run;
3. :mod:`~pipeline.audit.attacks`: APGD-CE and APGD-T (Croce & Hein 2020), on an int8 graph on its float twin too;
   then alpha-CROWN (Xu et al. 2021) and branch and bound (beta-CROWN's idea, Wang et al. 2021); the card's PGD
   (Madry et al. 2018, ``steps`` x ``restarts``); the gradient-free Square attack (Andriushchenko et al. 2020): an
   example it breaks after every gradient attack failed is a sign of gradient masking, and the report says so;
4. :mod:`~pipeline.audit.sweep`: optionally, the verifiers and a smaller PGD at each radius of ``sweep_eps``.

Every candidate an attack finds is confirmed by onnxruntime, and so is every iterate whose torch margin is within
``confirm_margin`` of the boundary. The report (:mod:`~pipeline.audit.report`) keeps per attack how many examples it
broke first, the verified / broken / undecided / timeout / error counts and each accuracy's 95% Clopper-Pearson
interval (rounded outward); each example's record (:mod:`~pipeline.audit.records`) its status, the phase that
decided it, its margin bounds and its seconds per phase. With a journal (:mod:`~pipeline.audit.journal`) a killed
audit resumes where it stopped; with workers (:mod:`~pipeline.audit.parts`) it shards across processes. Either way
the report and every record are the uninterrupted one-process audit's, but seconds.

The package imports nothing itself: import from the module that owns a name (``pipeline.audit.run.run_audit``,
``pipeline.audit.report.AuditReport``, ``pipeline.audit.records.write_results``, ...), so a reader of the report
(the export and report stages) does not load, and does not depend on, the attacks and the verifiers.
"""
