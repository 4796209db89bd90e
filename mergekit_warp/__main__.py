from mergekit_warp.cli import main

main()
