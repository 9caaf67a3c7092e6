import sys
from zchunk.cli import main
main()
