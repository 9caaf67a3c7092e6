from zchunk.cli import main

main()
