"""Pure feature functions over decoded RGB arrays: embedding, SSIM, ORB, hashing."""
