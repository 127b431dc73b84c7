import faulthandler
import sys

from .train import main

faulthandler.enable()  # a crash in native code (a rank dying with SIGSEGV) prints every thread's Python stack
sys.exit(main())
