"""``python -m bench``: run every benchmark in this folder."""

import sys

from bench import ask, llama, sms_burst

for benchmark in (ask, sms_burst, llama):
    sys.argv = [benchmark.__name__]
    benchmark.main()
