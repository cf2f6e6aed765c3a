from voxblock.cli import main

main()
