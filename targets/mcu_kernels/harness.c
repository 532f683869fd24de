/* graphopt's test harness for a generated model: reads graphopt_in.bin (a uint32 count,
 * then that many samples of every input, float32, concatenated in input order), runs the
 * model on each and writes graphopt_out.bin (the outputs, concatenated likewise). The
 * same file runs on the host and, through semihosting, on a Cortex-M under emulation. */
#include <stdio.h>

#include "model.h"

static float inputs[GRAPHOPT_MODEL_INPUT_FLOATS];
static float outputs[GRAPHOPT_MODEL_OUTPUT_FLOATS];

int main(void)
{
    unsigned long count = 0, i;
    unsigned char header[4];
    FILE *in = fopen("graphopt_in.bin", "rb"), *out;
    if (!in || fread(header, 1, 4, in) != 4) {
        printf("graphopt-harness: cannot read graphopt_in.bin\n");
        return 1;
    }
    count = header[0] | (header[1] << 8) | ((unsigned long)header[2] << 16) |
            ((unsigned long)header[3] << 24);
    out = fopen("graphopt_out.bin", "wb");
    if (!out) {
        printf("graphopt-harness: cannot write graphopt_out.bin\n");
        return 1;
    }
    for (i = 0; i < count; ++i) {
        if (fread(inputs, sizeof(float), GRAPHOPT_MODEL_INPUT_FLOATS, in) !=
            GRAPHOPT_MODEL_INPUT_FLOATS) {
            printf("graphopt-harness: graphopt_in.bin ends in sample %lu\n", i);
            return 1;
        }
        if (graphopt_model_run_packed(inputs, outputs) != 0) {
            printf("graphopt-harness: the model failed on sample %lu\n", i);
            return 1;
        }
        if (fwrite(outputs, sizeof(float), GRAPHOPT_MODEL_OUTPUT_FLOATS, out) !=
            GRAPHOPT_MODEL_OUTPUT_FLOATS) {
            printf("graphopt-harness: cannot write sample %lu\n", i);
            return 1;
        }
    }
    fclose(in);
    if (fclose(out) != 0) {
        printf("graphopt-harness: cannot close graphopt_out.bin\n");
        return 1;
    }
    printf("graphopt-harness: ok %lu\n", count);
    return 0;
}
