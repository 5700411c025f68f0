#include <stdio.h>
int main(void) { fputs("oops\n", stderr); }
