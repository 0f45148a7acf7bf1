"""``python -m bench``: run every benchmark in this folder."""

import sys

from bench import ask, grammar, llama, overload, quality, sms_burst, soak, telegram_burst

# The soak is long by nature: a short one here; its 30-minute run is done by hand (README).
benchmarks = ((ask, []), (sms_burst, []), (sms_burst, ["--channel", "whatsapp"]),
              (telegram_burst, []), (quality, []), (llama, []), (overload, []), (grammar, []),
              (soak, ["--minutes", "3"]))  # fmt: skip
for benchmark, args in benchmarks:
    sys.argv = [benchmark.__name__, *args]
    benchmark.main()
