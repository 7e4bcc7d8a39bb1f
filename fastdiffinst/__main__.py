from fastdiffinst.cli import console_main

console_main()
