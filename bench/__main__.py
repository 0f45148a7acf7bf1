"""``python -m bench``: run every benchmark in this folder."""

import sys

from bench import ask, llama, sms_burst, soak

# The soak is long by nature: a short one here; its 30-minute run is done by hand (README).
for benchmark, args in ((ask, []), (sms_burst, []), (llama, []), (soak, ["--minutes", "3"])):
    sys.argv = [benchmark.__name__, *args]
    benchmark.main()
