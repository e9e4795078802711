"""mttl: multi-task transfer learning with routed modular adapters on Ray.

Importing the package sets the process environment Ray reads when it is imported, so every entry
point (CLI, jobs/, a notebook that imports mttl first) agrees with the clusters it starts.
"""

import os as _os

# A cluster mttl starts listens on 127.0.0.1 only (Ray otherwise rewrites loopback to the machine's
# public interface); tokenizers must not fork thread pools inside Ray workers. Values the user
# exported win. Ray's authentication mode is deliberately not set here: Ray turns token auth on for
# a local cluster it starts and leaves it as the cluster has it when joining one, and the workers
# inherit whatever their cluster runs with.
for _key, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    _os.environ.setdefault(_key, _value)
